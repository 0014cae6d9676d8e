"""Inference on a bundle with ONNX Runtime: text -> normalise -> encode -> graph -> spam probability.

`Classifier.classify` is the whole path for a list of texts. The server's micro-batcher uses the lower
levels: `encode` (normalise + tokenise + truncate, per text) and `run_encoded` / `probabilities` on a
padded batch. No torch or transformers here: serving needs only onnxruntime, tokenizers and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from serving import thresholds as TH
from serving.bundle import Bundle, BundleError
from serving.text import Encoded, Encoder, TextSettings, language_tag, normalize

TOKEN_SCORES = "token_scores"  # the optional second graph output (training/token_scores.py)

# Inputs a graph may take and how each is made from the encoder's (ids, mask). An encoder exported with
# token_type_ids gets zeros: every message is a single segment.
_FEEDS = {
    "input_ids": lambda ids, mask: ids,
    "attention_mask": lambda ids, mask: mask,
    "token_type_ids": lambda ids, mask: np.zeros_like(ids),
}


def spam_probability(logits: np.ndarray) -> np.ndarray:
    """softmax(logits)[:, 1], computed as a sigmoid of the logit difference in float64 (no overflow)."""
    logits = np.asarray(logits, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))


class OnnxGraph:
    """One ONNX Runtime session over a graph whose inputs are named like the tokenizer's outputs."""

    def __init__(self, path: str | Path, threads: int = 0, output: str = "logits", spin: bool = True):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if not spin:
            # Idle intra-op threads otherwise spin for a while after each call, taking the cores that the
            # server's event loop (HTTP parsing, JSON, tokenisation) needs between batches.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.intra_op_num_threads = max(0, int(threads))  # 0 = ONNX Runtime's default (physical cores)
        so.inter_op_num_threads = 1  # one request batch at a time per session; parallelism is intra-op
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types; report the file
            raise BundleError(f"cannot load ONNX graph {path}: {str(e).splitlines()[0]}") from None
        self.path = Path(path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.input_names if n not in _FEEDS]
        if unknown:
            raise BundleError(f"{path}: graph input(s) {unknown} cannot be fed from the tokenizer "
                              f"(known: {', '.join(_FEEDS)})")
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = output if output in outputs else outputs[0]
        self.outputs = outputs

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, *extra: str) -> np.ndarray | list[np.ndarray]:
        """Logits (batch, 2) for a padded int64 batch; with `extra` output names, [logits, *those] from the
        same session.run."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        feed = {name: _FEEDS[name](ids, mask) for name in self.input_names}
        out = self.session.run([self.output, *extra], feed)
        return out if extra else out[0]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted by length, ties by position): little
    padding per batch, and the same inputs always give the same batches (deterministic numbers)."""
    order = sorted(range(len(lengths)), key=lambda k: (lengths[k], k))
    return [order[i:i + batch_size] for i in range(0, len(order), max(1, batch_size))]


@dataclass
class Prepared:
    """One text ready for the graph: token ids after truncation, plus what the response reports."""

    encoded: Encoded
    lang: str

    @property
    def truncated(self) -> bool:
        return self.encoded.truncated

    def __len__(self) -> int:
        return len(self.encoded.input_ids)


def prepare_texts(encoder: Encoder, settings: TextSettings, texts: Sequence[str]) -> list[Prepared]:
    """Normalise (with the settings' digit masking), tag the language, encode (with its truncation)."""
    norm = [normalize(t, settings.mask_digits) for t in texts]
    return [Prepared(e, language_tag(t)) for e, t in zip(encoder.encode_batch(norm), norm)]


def _length(item: Prepared | Encoded) -> int:
    return len(item) if isinstance(item, Prepared) else len(item.input_ids)


class Classifier:
    """Spam classifier over a loaded bundle.

    variant: "int8" | "fp32" | "auto" (int8 when the bundle has one, else fp32).
    Labels follow the served graph's threshold policy (`bundle.policy_for(variant)`, serving/thresholds.py:
    the int8 graph's own when the export chose one on its validation scores): a text is spam iff its
    probability >= the threshold of its language tag, or the global one (`self.threshold`) when its
    language has none of its own.
    threads: ONNX Runtime intra-op threads (0 = its default).
    batch_size: texts per graph call in `classify`/`predict_proba`; texts are sorted by token length first
    so that each sub-batch pads little, and results are put back in input order (deterministic: the same
    texts give the same sub-batches and the same numbers). fp32 scores do not depend on the batch; int8
    ones move with their batch-mates (dynamic quantisation scales the attention inputs per batch tensor:
    bench/quality.py measures by how much).
    """

    def __init__(self, bundle: Bundle, variant: str = "auto", threads: int = 0, batch_size: int = 32,
                 spin: bool = True):
        if variant == "auto":
            variant = "int8" if bundle.has("int8") else "fp32"
        self.bundle = bundle
        self.variant = variant
        self.policy = bundle.policy_for(variant)
        self.threshold = float(self.policy["default"])  # the global threshold
        self.batch_size = max(1, int(batch_size))
        self.encoder: Encoder = bundle.encoder()
        self.graph = OnnxGraph(bundle.model_path(variant), threads=threads, output=bundle.output, spin=spin)
        missing = [n for n in bundle.inputs if n not in self.graph.input_names]
        if missing:
            raise BundleError(f"{bundle.path}: bundle.json lists input(s) {missing} that the {variant} graph lacks")
        # explanations by decomposition (serving/explain.py) when the bundle lists the output and the graph has it
        self.has_token_scores = bundle.has_token_scores and TOKEN_SCORES in self.graph.outputs

    # ------------------------------------------------------------------ per-text preparation

    def encode(self, texts: Sequence[str]) -> list[Prepared]:
        """Normalise (with the bundle's digit masking), tag the language and encode (with its truncation)."""
        return prepare_texts(self.encoder, self.bundle.text, texts)

    # ------------------------------------------------------------------ batch level (the server's batcher)

    def pad(self, items: Sequence[Prepared | Encoded]) -> tuple[np.ndarray, np.ndarray]:
        return self.encoder.pad([i.encoded if isinstance(i, Prepared) else i for i in items])

    def run_encoded(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits (batch, 2) of one padded batch."""
        return self.graph.run(input_ids, attention_mask)

    def run_decomposed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (batch, 2), token_scores (batch, seq)) of one padded batch, from one session.run: z =
        logits[:, 1] - logits[:, 0] equals token_scores.sum(1) + the head's bias (0 at padding)."""
        if not self.has_token_scores:
            raise BundleError(f"{self.bundle.path}: the {self.variant} graph has no {TOKEN_SCORES} output")
        logits, scores = self.graph.run(input_ids, attention_mask, TOKEN_SCORES)
        return logits, scores

    def decompose(self, items: Sequence[Prepared | Encoded]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits (n, 2) float64, each row's token scores (float64, one per token id, specials included))
        in input order, in length-sorted sub-batches of `batch_size`."""
        items = list(items)
        logits = np.empty((len(items), 2), dtype=np.float64)
        scores: list[np.ndarray] = [np.empty(0)] * len(items)
        for idx, ids, mask in self._padded_batches(items):
            out, s = self.run_decomposed(ids, mask)
            logits[idx] = out
            for row, k in enumerate(idx):
                scores[k] = s[row, :_length(items[k])].astype(np.float64)
        return logits, scores

    def _padded_batches(self, items: list[Prepared | Encoded]) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """(indices into `items`, padded ids, mask) of each length-sorted sub-batch of `batch_size`."""
        for idx in length_batches([_length(i) for i in items], self.batch_size):
            ids, mask = self.pad([items[k] for k in idx])
            yield idx, ids, mask

    def logits(self, items: Sequence[Prepared | Encoded]) -> np.ndarray:
        """Logits (n, 2) of prepared texts, in input order, computed in length-sorted sub-batches."""
        items = list(items)
        out = np.empty((len(items), 2), dtype=np.float64)
        for idx, ids, mask in self._padded_batches(items):
            out[idx] = self.run_encoded(ids, mask)
        return out

    def probabilities(self, items: Sequence[Prepared | Encoded]) -> np.ndarray:
        """Spam probabilities (n,) of prepared texts, in input order."""
        return spam_probability(self.logits(items)) if len(items) else np.empty(0, dtype=np.float64)

    # ------------------------------------------------------------------ whole path

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Spam probability of each text (float64, shape (n,))."""
        return self.probabilities(self.encode(texts))

    def threshold_for(self, lang: str) -> tuple[float, str]:
        """(threshold, scope) that applies to a text of language tag `lang` ("lang:<tag>" or "global")."""
        return TH.threshold_for(self.policy, lang)

    def result(self, prepared: Prepared, probability: float) -> dict:
        p = float(probability)
        threshold, scope = self.threshold_for(prepared.lang)
        return {
            "label": self.bundle.labels[1] if p >= threshold else self.bundle.labels[0],
            "spam_probability": p,
            "threshold": threshold,
            "threshold_scope": scope,
            "lang": prepared.lang,
            "truncated": prepared.truncated,
        }

    def classify(self, texts: Sequence[str]) -> list[dict]:
        """[{label, spam_probability, threshold, threshold_scope, lang, truncated}] in input order;
        `threshold` is the one that applied to that text (its language's, or the global one)."""
        prepared = self.encode(texts)
        probs = self.probabilities(prepared)
        return [self.result(p, q) for p, q in zip(prepared, probs)]
