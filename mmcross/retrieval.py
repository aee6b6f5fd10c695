"""Two-stage retrieval over an index: dual-encoder top-k candidates, then (optionally) fusion re-ranking.

Scores of a hit (see `mmcross.model`): `itc` is the cosine of the dual-encoder embeddings; with re-ranking, `itm` is
the match head's probability and `score = itm + itc_weight * itc`, what the hits are ordered by; without
re-ranking `itm` is None and `score = itc`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmcross.config import InferenceCfg, ModelRef, to_dict
from mmcross.encode import encode_query
from mmcross.features import ImageFeatures, TextFeatures
from mmcross.index import search as backends
from mmcross.index.store import IndexStore
from mmcross.model import Matcher

TARGETS = ("images", "captions")


@dataclass
class Hit:
    """One result: a row of the index's images (or captions) and its scores."""

    rank: int  # 1-based
    corpus_id: int  # row in img_emb (target images) or text_emb (target captions)
    score: float  # ranking score: itm + itc_weight * itc with re-ranking, else itc
    itc: float  # dual-encoder cosine
    itm: float | None  # match probability from the fusion head; None without re-ranking
    image_id: str
    caption: str | None  # the caption (target captions) or the image's first caption
    path: str | None  # the image file

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Query:
    """A caption or an image file to search with."""

    text: str | None = None
    image: str | None = None

    @property
    def label(self) -> str:
        return self.text if self.text is not None else str(self.image)


@dataclass
class Answer:
    """The hits of one query, or why it could not be searched (`reject`, e.g. an unreadable image; no hits then).

    Unpacks as `(query, hits)`.
    """

    query: Query
    hits: list[Hit]
    reject: str | None = None

    def __iter__(self):
        return iter((self.query, self.hits))

    def to_dict(self) -> dict:
        out = {"query": self.query.label, "hits": [h.to_dict() for h in self.hits]}
        return out if self.reject is None else {**out, "reject": self.reject}


def check_fingerprint(index: IndexStore, fingerprint: str, model_name: str, config: dict | None = None) -> None:
    """Refuse a query model whose weights differ from the index's, naming both and the config fields that differ
    (`config`: the query model's `to_dict(MatcherCfg)`)."""
    manifest = index.manifest
    if manifest["fingerprint"] == fingerprint:
        return
    from mmcross.factory import reference_name

    name = reference_name(ModelRef.from_dict(manifest["model"]))
    query = "" if model_name == name else f" {model_name}"
    diffs = config_differences(manifest["model"].get("config"), config)
    what = f"differs in {', '.join(diffs)}" if diffs else "has other weights (the same config)"
    raise ValueError(
        f"index {index.root} was built with model {name} (fingerprint {manifest['fingerprint']}), but the query "
        f"model{query} (fingerprint {fingerprint}) {what}; embed queries with the index's model or rebuild the index"
    )


def config_differences(index_config: dict | None, query_config: dict | None, most: int = 4) -> list[str]:
    """The fields two matcher configs disagree on, as `key (index VALUE, query VALUE)`, at most `most` (then a count).

    Empty when either config is unknown (an index from before configs were recorded).
    """
    if not index_config or not query_config:
        return []
    import json

    from mmcross.config import flatten_dotted

    a, b = (flatten_dotted(json.loads(json.dumps(c))) for c in (index_config, query_config))  # tuples -> lists
    keys = [k for k in sorted(a.keys() | b.keys()) if k != "description" and a.get(k) != b.get(k)]
    out = [f"{k} (index {a.get(k)!r}, query {b.get(k)!r})" for k in keys[:most]]
    return out + ([f"{len(keys) - most} more field(s)"] if len(keys) > most else [])


class Retriever:
    """Searches one index with one matcher (checked against the index's fingerprint).

    Args:
        index: an opened index.
        matcher: the model that built it.
        backend: "auto" (the index's faiss index where it has one, else exact), "exact" or "faiss".
        nprobe: IVF lists to visit (faiss IVF only).
    """

    def __init__(self, index: IndexStore, matcher: Matcher, backend: str = "auto", nprobe: int | None = None):
        self.index, self.matcher, self.backend, self.nprobe = index, matcher, backend, nprobe
        self._faiss: dict[str, object] = {}

    def _vectors(self, target: str) -> np.ndarray:
        vectors = self.index.img_emb if target == "images" else self.index.text_emb
        if vectors is None or len(vectors) == 0:
            raise ValueError(f"index {self.index.root} holds no {target} (built with --no-{target})")
        return vectors

    def candidates(self, queries: np.ndarray, target: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Dual-encoder top-k: (itc (Q, k), rows (Q, k))."""
        vectors = self._vectors(target)
        faiss_file = self.index.manifest.get("faiss", {}).get(target)
        if self.backend == "faiss" and not faiss_file:
            raise ValueError(f"index {self.index.root} has no faiss index for {target} (build with --faiss)")
        if self.backend in ("auto", "faiss") and faiss_file:
            if target not in self._faiss:
                self._faiss[target] = backends.load_faiss(self.index.root / faiss_file)
            return backends.faiss_search(self._faiss[target], queries, k, self.nprobe)
        if self.nprobe is not None:  # accepted and ignored would be a silent no-op
            why = "--backend exact" if self.backend == "exact" else f"the index has no faiss index for {target}"
            raise ValueError(f"--nprobe tunes a faiss IVF index; this search is exact ({why})")
        return backends.exact_search(vectors, queries, k)

    def search(
        self, query: Query | ImageFeatures | TextFeatures, target: str = "images", k: int = 10, rerank: int = 0
    ) -> list[Hit]:
        """Top-k hits of one query; with `rerank` > 0 the fusion head re-scores the top max(rerank, k) first.

        Args:
            query: a caption or an image file, or its features (`encode_query`).
            target: "images" or "captions" (any query kind may search either).
            k: hits returned.
            rerank: candidates re-ranked by the fusion head (0: dual encoder only).
        """
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}")
        features = encode_query(self.matcher, query.text, query.image) if isinstance(query, Query) else query
        vector = features.pooled.numpy()  # (1, E)
        n_cand = max(k, rerank) if rerank else k
        itc, rows = self.candidates(vector, target, n_cand)
        itc, rows = itc[0], rows[0]
        keep = rows >= 0  # faiss pads with -1 when it finds fewer
        itc, rows = itc[keep], rows[keep]
        itm = None
        score = itc.astype(np.float64)
        if rerank:
            scores = self._rerank(features, target, rows)
            itm = scores.itm.float().cpu().numpy()
            itc = scores.itc.float().cpu().numpy()
            score = scores.score.float().cpu().numpy()
            order = np.argsort(-score, kind="stable")[:k]
            rows, itc, itm, score = rows[order], itc[order], itm[order], score[order]
        return self._hits(target, rows[:k], score[:k], itc[:k], None if itm is None else itm[:k])

    def _rerank(self, query: ImageFeatures | TextFeatures, target: str, rows: np.ndarray):
        if target == "images":
            if not isinstance(query, TextFeatures):
                raise ValueError("re-ranking scores image-caption pairs: an image query re-ranks --target captions")
            pooled = torch.from_numpy(np.asarray(self.index.img_emb[rows]))
            candidates = ImageFeatures(pooled, self.index.image_tokens(rows))
        else:
            if not isinstance(query, ImageFeatures):
                raise ValueError("re-ranking scores image-caption pairs: a caption query re-ranks --target images")
            tokens, mask = self.index.text_tokens(rows)
            candidates = TextFeatures(torch.from_numpy(np.asarray(self.index.text_emb[rows])), tokens, mask)
        return self.matcher.rerank(query, candidates)

    def _hits(self, target, rows, score, itc, itm) -> list[Hit]:
        table = self.index.metadata if target == "images" else self.index.text_metadata
        meta = table.take(pa_indices(rows)).to_pylist()
        # Image rows carry their path; caption rows name their image, whose path the image metadata holds.
        paths = None if target == "images" else self._image_paths()
        return [
            Hit(
                i + 1,
                int(row),
                float(score[i]),
                float(itc[i]),
                _opt(itm, i),
                m["image_id"],
                m["caption"],
                m["path"] if paths is None else paths.get(m["image_id"]),
            )
            for i, (row, m) in enumerate(zip(rows, meta))
        ]

    def _image_paths(self) -> dict[str, str]:
        if not hasattr(self, "_paths"):
            meta = self.index.metadata
            self._paths = dict(zip(meta["image_id"].to_pylist(), meta["path"].to_pylist()))
        return self._paths


def pa_indices(rows: np.ndarray):
    import pyarrow as pa

    return pa.array(np.asarray(rows, dtype=np.int64))


def _opt(values, i: int) -> float | None:
    return None if values is None else float(values[i])


def dataset_root(index_dir: str | Path) -> Path:
    """The folder an index's image paths are shown relative to: the `--image-root` it was built with, else its dataset
    folder (or the folder of its dataset file)."""
    from mmcross.index.store import read_manifest

    manifest = read_manifest(index_dir)
    root = Path((manifest.get("data") or {}).get("image_root") or manifest.get("dataset") or ".")
    return root if root.is_dir() else root.parent


def short_path(path: str | None, root: str | Path) -> str:
    """`path` relative to `root` when it lies under it (unique within a dataset, and short), else as stored."""
    import os

    if not path:
        return ""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return path


def read_queries(path: str | Path) -> list[Query]:
    """Queries from a file: JSONL objects with "text" or "image" (a path), else one caption per line.

    JSONL by its suffix (`.jsonl`, `.ndjson`) or, under any other name, when its first line is such an object (a
    `queries.txt` of JSON lines would otherwise search for the JSON text itself)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no queries file {path}")
    # invalid UTF-8 becomes U+FFFD (as in every table): one bad byte does not cost the other queries
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"queries file {path} holds no query (one caption a line, or JSONL with text or image)")
    if path.suffix.lower() in (".jsonl", ".ndjson") or _query_object(lines[0]):
        out = []
        for number, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not JSON") from None
            if not isinstance(obj, dict) or not ("text" in obj or "image" in obj):
                raise ValueError(f"{path}:{number}: expected an object with 'text' or 'image'")
            if not all(isinstance(obj.get(key), str | None) for key in ("text", "image")):
                raise ValueError(f"{path}:{number}: 'text' and 'image' must be strings")
            image = obj.get("image")
            if image is not None and not Path(image).is_absolute():
                image = str(path.parent / image)
            out.append(Query(text=obj.get("text"), image=image))
        return out
    return [Query(text=line.strip()) for line in lines]


def _query_object(line: str) -> bool:
    """Whether a line is a JSON query object ({"text": ...} or {"image": ...})."""
    import json

    if not line.lstrip().startswith("{"):
        return False
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and ("text" in obj or "image" in obj)


def index_model(index_dir: str | Path, ref: ModelRef | None = None, overrides: dict | None = None) -> ModelRef:
    """The model to query an index with: `ref` when given, else the one the index's manifest records (exactly the
    model that built it: preset or config file, weights, checkpoint, `--set` overrides); `overrides` go on top."""
    if ref is None:
        from mmcross.index.store import read_manifest

        ref = ModelRef.from_dict(read_manifest(index_dir)["model"])
    if overrides:
        ref = dataclasses.replace(ref, overrides={**ref.overrides, **overrides})
    return ref


def search_index(
    index_dir: str | Path,
    queries: list[Query],
    *,
    ref: ModelRef | None = None,
    overrides: dict | None = None,
    matcher: Matcher | None = None,
    target: str = "images",
    k: int = 10,
    rerank: int = 0,
    backend: str = "auto",
    nprobe: int | None = None,
    html: str | Path | None = None,
    allow_untrained_head: bool = False,
    inference: InferenceCfg | None = None,
) -> list[Answer]:
    """`mmcross search`: open an index, load its model (see `index_model`; or use `matcher`), check the weights'
    fingerprint against the index, run every query (one process, one load), and write the hits as an HTML gallery
    to `html` when given. A query that cannot be encoded (an unreadable image) gets an `Answer` with its `reject`
    reason and no hits; the others are answered. `rerank` with a head no run has trained raises `UntrainedHead`
    unless `allow_untrained_head`. Queries are encoded as `inference` says (`mmcross.fast`), by default as the index
    was built; a field of `inference` left None is the index's (the runtime only when the precision is the index's
    too, else `auto`; the precision fp32 with runtime torch). Another precision or runtime than the index's works
    (same weights, close vectors) and is noted once."""
    from mmcross.factory import load_matcher, model_fingerprint, reference_name
    from mmcross.fast import note, use_inference
    from mmcross.index.build import describe_inference, inference_of

    if backend not in ("auto", "exact", "faiss"):
        raise ValueError(f"--backend takes auto, exact or faiss, not {backend!r}")
    index = IndexStore(index_dir)
    ref = index_model(index_dir, ref, overrides)
    built = inference_of(index.manifest)
    loaded = matcher is None
    matcher = matcher if matcher is not None else load_matcher(ref)
    check_fingerprint(index, model_fingerprint(matcher), reference_name(ref), to_dict(matcher.cfg))
    if inference is not None:  # `--runtime openvino` alone keeps the index's precision, as --help says
        # (torch runs fp32 only: `--runtime torch` alone means fp32 queries)
        precision = inference.precision or ("fp32" if inference.runtime == "torch" else built["precision"])
        same = precision == built["precision"]
        inference = InferenceCfg(precision, inference.runtime or (built["runtime"] if same else "auto"))
    if loaded or inference is not None:  # after the check: another model is refused before any graph is built
        use_inference(matcher, inference or InferenceCfg(built["precision"], built["runtime"]), ref)
    if to_dict(matcher.inference) != built:
        note(
            f"index {index.root} holds {describe_inference(built)} vectors, the queries are encoded "
            f"{describe_inference(to_dict(matcher.inference))}: the same weights, so the vectors are close, not equal"
        )
    if rerank and not allow_untrained_head:
        matcher.require_trained_head("--rerank")
    retriever = Retriever(index, matcher, backend=backend, nprobe=nprobe)
    if rerank:  # before any query is answered: the fusion scores image-caption pairs only
        wanted = "a caption" if target == "images" else "an image"
        for number, q in enumerate(queries, 1):
            if (q.image is not None) == (target == "images"):
                raise ValueError(
                    f"query {number} ({f'image {q.image}' if q.image is not None else f'caption {q.text!r}'}) "
                    f"cannot be re-ranked against --target {target}: "
                    f"re-ranking scores image-caption pairs, so --target {target} takes {wanted} query"
                )
    results = []
    for q in queries:
        try:  # one unreadable query image (or empty caption) is reported, not the end of the batch
            features = encode_query(matcher, q.text, q.image)
        except (ValueError, FileNotFoundError) as err:
            results.append(Answer(q, [], reject=str(err)))
            continue
        results.append(Answer(q, retriever.search(features, target=target, k=k, rerank=rerank)))
    if html is not None:
        from mmcross.report.gallery import write_search_gallery

        write_search_gallery(results, html, title=f"mmcross search: {Path(index_dir).name}")
    return results
