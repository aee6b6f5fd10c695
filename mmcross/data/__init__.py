"""Dataset readers, safe image loading and loaders."""
