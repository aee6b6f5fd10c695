"""HTML galleries: self-contained, escaped, hits in rank order; `search --html` end to end on the tiny preset."""

from __future__ import annotations

import re

import pytest
import torch
from index_helpers import make_dataset
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mmcross.report.gallery import failures_gallery, search_gallery, thumbnail_uri, worst_failures
from mmcross.retrieval import Hit, Query

XSS = "<script>alert(1)</script>"


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        path = tmp_path / f"im{i}.jpg"
        Image.new("RGB", (300, 200), colour).save(path)
        paths.append(str(path))
    return paths


def _hits(paths):
    return [
        Hit(1, 2, 0.9, 0.4, 0.5, "im2", XSS, paths[2]),
        Hit(2, 0, 0.7, 0.3, 0.4, "im0", "a red card", paths[0]),
        Hit(3, 1, 0.5, 0.2, None, "<b>im1</b>", "a green card", paths[1] + ".missing"),
    ]


def test_user_strings_are_escaped(images):
    page = search_gallery([(Query(text=XSS), _hits(images))], title=XSS)
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 4  # title, heading, query label, caption
    assert "&lt;b&gt;im1&lt;/b&gt;" in page and "<b>" not in page


def test_gallery_lists_hits_in_rank_order_with_embedded_thumbnails(images):
    hits = _hits(images)
    page = search_gallery([(Query(text="cards"), [hits[2], hits[0], hits[1]])])
    assert [int(r) for r in re.findall(r'data-rank="(\d+)"', page)] == [1, 2, 3]
    assert page.index("im2") < page.index("im0") < page.index("im1")
    thumbs = re.findall(r'<img src="(data:image/jpeg;base64,[A-Za-z0-9+/=]+)"', page)
    assert len(thumbs) == 2  # the third image is missing: a placeholder, not a broken link
    assert "no image" in page and "file://" not in page and "itm 0.500" in page


def test_thumbnail_is_small_jpeg(images, tmp_path):
    import base64
    import io

    uri = thumbnail_uri(images[0])
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 160
    assert thumbnail_uri(tmp_path / "nope.jpg") is None


def test_worst_failures_rank_lowest_first_and_show_what_ranked_above(images):
    # 3 images, 3 captions (one each): caption 2's image ranks last; image 1's caption ranks second.
    sim = torch.tensor([[0.9, 0.1, 0.8], [0.95, 0.9, 0.7], [0.1, 0.2, 0.3]])
    caps = ["red " + XSS, "green", "blue"]
    ids = [(f"im{i}", p) for i, p in enumerate(images)]
    failures = worst_failures(sim, sim, torch.tensor([0, 1, 2]), caps, ids, n=5, above=2)
    t2i = [f for f in failures if f.direction == "text_to_image"]
    assert [(f.query.caption, f.rank) for f in t2i] == [("blue", 3), ("red " + XSS, 2)]
    assert [a.image_id for a in t2i[0].above] == ["im0", "im1"]
    i2t = [f for f in failures if f.direction == "image_to_text"]
    assert [(f.query.image_id, f.rank) for f in i2t] == [("im1", 2)]
    assert [(a.caption, a.rank) for a in i2t[0].above] == [("red " + XSS, 1)] and i2t[0].truth.caption == "green"
    page = failures_gallery(failures)
    assert "<script" not in page and "&lt;script&gt;" in page
    assert [int(r) for r in re.findall(r'class="failure" data-rank="(\d+)"', page)] == [3, 2, 2]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("gallery")
    dataset = make_dataset(root / "ds", n=6, missing=False)
    out = root / "index"
    args = ["index", str(dataset), "--out", str(out), "--model", "tiny", "-j", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_search_html_end_to_end(tiny_index, tmp_path):
    html = tmp_path / "hits.html"
    args = ["search", str(tiny_index), "--text", XSS, "--k", "4", "--rerank", "6", "--html", str(html)]
    args += ["--allow-untrained-head"]  # random init: the page is tested, not the head
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    page = html.read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert [int(r) for r in re.findall(r'data-rank="(\d+)"', page)] == [1, 2, 3, 4]
    assert page.count("data:image/jpeg;base64,") == 4 and "itm " in page
