"""Self-contained HTML galleries: search hits (`search --html`) and the worst retrieval failures (`eval --html`).

One file, nothing beside it: thumbnails are small JPEGs embedded as base64 `data:` URIs, styles are inline and the
page runs no script. Every user string (captions, ids, paths, query text) goes through jinja2 with autoescaping on,
so a caption `<script>alert(1)</script>` shows as text.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

THUMB = 160  # longest thumbnail side in pixels

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em}h2{font-size:1.1em;margin:1.6em 0 .4em;word-break:break-word}
.meta{color:#666;font-size:.9em}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;list-style:none;padding:0}
.card{width:172px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:12px}
.card.truth{border:2px solid #2a9d3a}.card.query{border:2px solid #3a6ed8}
.card img,.noimg{display:block;width:160px;height:120px;object-fit:contain;background:#eee;margin:0 auto 4px}
.noimg{line-height:120px;text-align:center;color:#999}
.rank{font-weight:600}.score{font-family:ui-monospace,monospace}.cap{word-break:break-word}.id{color:#777}
.failure{margin-bottom:1.4em;padding-bottom:.8em;border-bottom:1px solid #ddd}
"""

_SEARCH = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">{{ note }}</p>
{% for q in queries %}
<section class="query" data-query="{{ loop.index }}">
<h2>{% if q.thumb %}<img src="{{ q.thumb }}" alt="query image" style="height:60px;vertical-align:middle"> {% endif %}
{{ q.label }}</h2>
{% if q.reject %}<p class="meta reject">not searched: {{ q.reject }}</p>{% endif %}
<ol class="row hits">
{% for h in q.hits %}
<li class="card hit" data-rank="{{ h.rank }}" value="{{ h.rank }}">
{% if h.thumb %}<img src="{{ h.thumb }}" alt="{{ h.image_id }}">{% else %}<div class="noimg">no image</div>{% endif %}
<div><span class="rank">#{{ h.rank }}</span> <span class="score">score {{ "%.3f"|format(h.score) }}</span></div>
<div class="score">itc {{ "%.3f"|format(h.itc) }}
{% if h.itm is not none %} · itm {{ "%.3f"|format(h.itm) }}{% endif %}</div>
<div class="id">{{ h.image_id }}</div>
{% if h.caption %}<div class="cap">{{ h.caption }}</div>{% endif %}
</li>
{% endfor %}
</ol>
</section>
{% endfor %}
</body></html>
"""

_FAILURES = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>{{ style }}</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">{{ note }}</p>
{% for section in sections %}
<h2>{{ section.heading }}</h2>
{% if not section.entries %}<p class="meta">none</p>{% endif %}
{% for f in section.entries %}
<div class="failure" data-rank="{{ f.rank }}">
<div><span class="rank">true match ranked #{{ f.rank }}</span>
<span class="score">(score {{ "%.3f"|format(f.truth.score) }})</span></div>
<div class="row">
<div class="card query">{% if f.query.thumb %}<img src="{{ f.query.thumb }}" alt="{{ f.query.image_id }}">{% endif %}
<div>query</div>{% if f.query.caption %}<div class="cap">{{ f.query.caption }}</div>{% endif %}
<div class="id">{{ f.query.image_id }}</div></div>
{% for a in f.above %}
<div class="card">{% if a.thumb %}<img src="{{ a.thumb }}" alt="{{ a.image_id }}">
{% elif not a.caption %}<div class="noimg">no image</div>{% endif %}
<div><span class="rank">#{{ a.rank }}</span> <span class="score">{{ "%.3f"|format(a.score) }}</span></div>
{% if a.caption %}<div class="cap">{{ a.caption }}</div>{% endif %}<div class="id">{{ a.image_id }}</div></div>
{% endfor %}
<div class="card truth">{% if f.truth.thumb %}<img src="{{ f.truth.thumb }}" alt="{{ f.truth.image_id }}">{% endif %}
<div><span class="rank">#{{ f.rank }} (true)</span> <span class="score">{{ "%.3f"|format(f.truth.score) }}</span></div>
{% if f.truth.caption %}<div class="cap">{{ f.truth.caption }}</div>{% endif %}
<div class="id">{{ f.truth.image_id }}</div></div>
</div></div>
{% endfor %}
{% endfor %}
</body></html>
"""


def _env():
    from jinja2 import Environment

    return Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)


def thumbnail_uri(source: str | Path | bytes | None, size: int = THUMB) -> str | None:
    """A small JPEG of an image file (or encoded bytes) as a `data:` URI; None when it is missing or unreadable."""
    if source is None:
        return None
    from mmcross.data.images import load_rgb

    try:
        if not isinstance(source, bytes) and not Path(source).is_file():
            return None
        image = load_rgb(source)
    except (ValueError, OSError):
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Thumbs:
    """Thumbnails by source, each encoded once per page."""

    def __init__(self):
        self._cache: dict[Any, str | None] = {}

    def __call__(self, source) -> str | None:
        key = source if isinstance(source, (str, Path, type(None))) else id(source)
        if key not in self._cache:
            self._cache[key] = thumbnail_uri(source)
        return self._cache[key]


def search_gallery(results: Sequence[tuple[Any, Sequence[Any]]], *, title: str = "mmcross search") -> str:
    """HTML of search results: per query, its hits in rank order with thumbnail, scores, id and caption.

    Args:
        results: (query, hits) pairs as `mmcross.retrieval.search_index` returns them (a query has `label` and
            `image`; a hit `rank`, `score`, `itc`, `itm`, `image_id`, `caption`, `path`; a result's `reject`, when
            it has one, says why its query was not searched).
        title: page title.
    """
    thumbs = _Thumbs()
    queries = []
    for result in results:
        query, hits = result
        rows = [
            {
                "rank": h.rank,
                "score": h.score,
                "itc": h.itc,
                "itm": h.itm,
                "image_id": h.image_id,
                "caption": h.caption,
                "thumb": thumbs(h.path),
            }
            for h in sorted(hits, key=lambda h: h.rank)
        ]
        image = getattr(query, "image", None)
        thumb = thumbs(image) if image else None
        queries.append({"label": query.label, "thumb": thumb, "hits": rows, "reject": getattr(result, "reject", None)})
    reranked = any(h.itm is not None for _, hits in results for h in hits)
    note = (
        "score = itm + itc_weight * itc (fusion re-ranked)" if reranked else "score = itc (dual-encoder cosine)"
    ) + f"; {len(queries)} quer{'y' if len(queries) == 1 else 'ies'}."
    return _env().from_string(_SEARCH).render(title=title, style=_STYLE, note=note, queries=queries)


def write_search_gallery(results: Sequence[tuple[Any, Sequence[Any]]], out: str | Path, **kwargs) -> Path:
    """Write `search_gallery(results)` to `out` (UTF-8); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(search_gallery(results, **kwargs), encoding="utf-8")
    return out


@dataclass
class Item:
    """An image or a caption shown in the failures gallery."""

    image_id: str
    caption: str | None = None  # set for captions
    source: str | Path | bytes | None = None  # the image (file or encoded bytes), for images
    score: float = 0.0
    rank: int = 0


@dataclass
class Failure:
    """A query whose true match ranked low, and what ranked above it."""

    direction: str  # "text_to_image" (a caption query) or "image_to_text" (an image query)
    rank: int  # 1-based rank of the (best) true match
    query: Item
    truth: Item
    above: list[Item] = field(default_factory=list)  # the best-ranked wrong candidates, best first


def failures_gallery(
    failures: Sequence[Failure], *, title: str = "mmcross eval: worst failures", note: str = ""
) -> str:
    """HTML of the worst failures, each direction in its own section, lowest true rank first."""
    thumbs = _Thumbs()

    def item(i: Item) -> dict:
        return {
            "image_id": i.image_id,
            "caption": i.caption,
            "score": i.score,
            "rank": i.rank,
            "thumb": None if i.caption is not None else thumbs(i.source),
        }

    sections = []
    for direction, heading in (
        ("text_to_image", "Caption -> image: captions whose image ranked lowest"),
        ("image_to_text", "Image -> caption: images whose best caption ranked lowest"),
    ):
        chosen = sorted((f for f in failures if f.direction == direction), key=lambda f: -f.rank)
        items = [
            {"rank": f.rank, "query": item(f.query), "truth": item(f.truth), "above": [item(a) for a in f.above]}
            for f in chosen
        ]
        sections.append({"heading": heading, "entries": items})
    return _env().from_string(_FAILURES).render(title=title, style=_STYLE, note=note, sections=sections)


def worst_failures(
    t2i_similarity,
    i2t_similarity,
    caption_image,
    captions: Sequence[str],
    images: Sequence[tuple[str, str | Path | bytes | None]],
    *,
    n: int = 20,
    above: int = 4,
    matches: torch.Tensor | None = None,
    shown: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[Failure]:
    """The `n` queries of each direction whose true match ranked lowest, with the `above` best wrong candidates.

    Args:
        t2i_similarity: (N_img, N_cap) scores that rank images per caption (column), higher is better.
        i2t_similarity: (N_img, N_cap) scores that rank captions per image (row).
        caption_image: (N_cap,) image index of each caption.
        captions: the N_cap captions.
        images: (image_id, file or bytes) of the N_img images.
        n: failures per direction.
        above: at most this many of the wrong candidates that ranked above the true match, per failure.
        matches: (N_img, N_cap) bool, every image each caption describes (`mmcross.metrics`); None = `caption_image`.
        shown: the (t2i, i2t) scores to print beside each item, where the ranking ones are not the model's own (a
            re-rank lifts its top K above the rest); None = the ranking scores.
    """
    import torch

    from mmcross.metrics import image_to_text_ranks, match_matrix, text_to_image_ranks

    caption_image = torch.as_tensor(caption_image).long()
    t2i, i2t = t2i_similarity.float().cpu(), i2t_similarity.float().cpu()
    t2i_shown, i2t_shown = (t2i, i2t) if shown is None else (shown[0].float().cpu(), shown[1].float().cpu())
    matches = match_matrix(caption_image, t2i.shape[0]) if matches is None else torch.as_tensor(matches).cpu()
    out: list[Failure] = []
    ranks = text_to_image_ranks(t2i, caption_image, matches)  # (N_cap,)
    for c in torch.argsort(-ranks, stable=True)[:n].tolist():
        if int(ranks[c]) <= 1:
            break
        column = t2i[:, c]
        true_images = matches[:, c].nonzero().flatten()
        true = int(true_images[column[true_images].argmax()])  # the best-ranked image the caption describes
        wrong = column.masked_fill(matches[:, c], float("-inf"))  # (N_img,) images the caption does not describe
        order = torch.argsort(-wrong, stable=True)[:above].tolist()
        order = order[: min(above, int(ranks[c]) - 1)]  # only what ranked above the true image
        own_id, own_src = images[true]
        out.append(
            Failure(
                "text_to_image",
                int(ranks[c]),
                Item(own_id, caption=captions[c]),
                Item(own_id, source=own_src, score=float(t2i_shown[true, c]), rank=int(ranks[c])),
                [
                    Item(images[i][0], source=images[i][1], score=float(t2i_shown[i, c]), rank=r + 1)
                    for r, i in enumerate(order)
                ],
            )
        )
    ranks = image_to_text_ranks(i2t, caption_image, matches)  # (N_img,), 0 for images without captions
    for i in torch.argsort(-ranks, stable=True)[:n].tolist():
        if int(ranks[i]) <= 1:
            break
        row = i2t[i]
        own = matches[i].nonzero().flatten()
        best = int(own[row[own].argmax()])
        order = [int(c) for c in torch.argsort(-row, stable=True)[: above + len(own)] if not matches[i, int(c)]]
        image_id, source = images[i]
        out.append(
            Failure(
                "image_to_text",
                int(ranks[i]),
                Item(image_id, source=source),
                Item(image_id, caption=captions[best], score=float(i2t_shown[i, best]), rank=int(ranks[i])),
                [
                    Item(
                        images[int(caption_image[c])][0], caption=captions[c], score=float(i2t_shown[i, c]), rank=r + 1
                    )
                    for r, c in enumerate(order[: min(above, int(ranks[i]) - 1)])
                ],
            )
        )
    return out


def write_failures_gallery(failures: Sequence[Failure], out: str | Path, **kwargs) -> Path:
    """Write `failures_gallery(failures)` to `out` (UTF-8); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(failures_gallery(failures, **kwargs), encoding="utf-8")
    return out
