"""Explanations by decomposition (serving/explain.py, training/token_scores.py): the exported graph's token_scores
add up to its logit (fp32 and int8), the server's effects equal p(full) - sigmoid(z - c) recomputed from the
token scores, offsets through the normaliser and truncation, an older bundle without token_scores explained by
occlusion, make eval's PyTorch decomposition equal to the server's, and the bench figure on a mean-pooled bundle."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import numpy as np
import pytest

from serving import explain as X
from serving.text import normalize_with_offsets


TEXTS = ["WIN a FREE iphone now! Click http://win.example.com to claim your prize",
         "恭喜您中奖了!点击链接领取手机大奖,限时优惠",
         "ＦＲＥＥ　ｆ\u200bree　ｍｏｎｅｙ &amp; prizes 😀",  # NFKC, zero-width, an entity, an emoji
         "【緊急】お客様のアカウントが停止されました。今すぐクリック",
         "축하합니다! 상품권 당첨되셨습니다. 지금 링크를 눌러 상품을 받으세요",
         "see you at lunch?"]


def _classifier(bundle, variant="fp32"):
    from serving.bundle import load_bundle
    from serving.inference import Classifier

    return Classifier(load_bundle(bundle), variant, threads=1)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# ------------------------------------------------------------------------------------------ the graph


@pytest.mark.parametrize("variant, limit", [("fp32", 1e-4), ("int8", 1e-3)])
def test_the_graph_token_scores_add_up_to_its_logit(tiny_mean_bundle, variant, limit):
    manifest = json.loads((tiny_mean_bundle / "bundle.json").read_text(encoding="utf-8"))
    assert manifest["outputs"] == ["logits", "token_scores"]
    bias = manifest["token_scores"]["bias"]
    gate = manifest["parity"]["token_scores"][variant]
    assert gate["passed"] and gate["max_abs_sum_error"] <= limit and gate["max_abs_padding_score"] == 0.0
    clf = _classifier(tiny_mean_bundle, variant)
    assert clf.has_token_scores
    ids, mask = clf.pad(clf.encode(TEXTS))  # one padded batch: the short rows are padded
    logits, scores = clf.run_decomposed(ids, mask)
    np.testing.assert_array_equal(logits, clf.run_encoded(ids, mask))  # the second output changes no logit
    z = logits[:, 1].astype(np.float64) - logits[:, 0]
    np.testing.assert_allclose(scores.sum(1, dtype=np.float64) + bias, z, atol=limit, rtol=0)
    assert np.all(scores[mask == 0] == 0.0) and (mask == 0).any()


def test_logits_parity_unchanged_and_the_torch_scores_match_the_graph(tiny_mean_bundle, tiny_mean_model_dir):
    import torch

    from training.export import load_torch_model
    from training.modeling import head_bias, logits_and_token_scores

    manifest = json.loads((tiny_mean_bundle / "bundle.json").read_text(encoding="utf-8"))
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["fp32"]["max_abs_logit_diff"] <= 1e-4
    model = load_torch_model(tiny_mean_model_dir)
    clf = _classifier(tiny_mean_bundle)
    ids, mask = clf.pad(clf.encode(TEXTS))
    with torch.inference_mode():
        logits_t, scores_t = logits_and_token_scores(model, torch.from_numpy(ids), torch.from_numpy(mask))
        forward = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    torch.testing.assert_close(logits_t, forward, rtol=0, atol=1e-6)  # the helper's logits are forward's
    logits, scores = clf.run_decomposed(ids, mask)
    np.testing.assert_allclose(scores, scores_t.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, logits_t.numpy(), atol=1e-4, rtol=0)
    assert head_bias(model) == pytest.approx(manifest["token_scores"]["bias"])


def test_a_cls_model_has_no_token_scores(tiny_bundle):
    manifest = json.loads((tiny_bundle / "bundle.json").read_text(encoding="utf-8"))
    assert manifest["outputs"] == ["logits"] and "token_scores" not in manifest["parity"]
    assert not _classifier(tiny_bundle).has_token_scores


# ------------------------------------------------------------------------------------------ the server


def _post(bundle, *bodies, **settings):
    from serving.server import create_app, load_model
    from serving.settings import ServerSettings

    classifier, info = load_model(ServerSettings(bundle=str(bundle), threads=1))
    app = create_app(ServerSettings(**settings), classifier.classify, info)

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return [await c.post("/v1/classify", json=b) for b in bodies]

    return asyncio.run(go())


def _independent_contributions(clf, texts: list[str]) -> list[tuple[float, dict[tuple[int, int], float], float]]:
    """Per text (z, {unit span of the text as sent: c}, the part of z in no unit) from the graph's token
    scores of all `texts` in one padded batch (int8 moves with its batch-mates), by a second route: each
    token's characters in the normalised text, mapped to the text as sent one character at a time; a token's
    score split over the units by the count of its characters inside each."""
    mask = clf.bundle.text.mask_digits
    found = [normalize_with_offsets(t, mask) for t in texts]
    encoded = clf.encoder.encode_with_offsets([norm for norm, _ in found])
    logits, scores = clf.run_decomposed(*clf.pad([e for e, _ in encoded]))
    return [_contributions(text, norm, src, offsets, float(lg[1]) - float(lg[0]), sc.astype(np.float64), mask)
            for text, (norm, src), (_, offsets), lg, sc in zip(texts, found, encoded, logits, scores)]


def _contributions(text, norm, src, offsets, z, scores, mask):
    spans = X.units(text, mask)
    c = {s: 0.0 for s in spans}
    rest = 0.0
    for off, t in zip(offsets, scores):
        inside = []
        for k in range(*off) if off else []:
            a, b = src[k]
            unit = next((s for s in spans if s[0] <= a and b <= s[1]), None)
            if unit is not None and not norm[k].isspace():
                inside.append(unit)
        if not inside:
            rest += t
        for unit in inside:
            c[unit] += t / len(inside)
    return z, c, rest


def test_server_effects_are_p_minus_sigmoid_z_minus_c_from_the_token_scores(tiny_mean_bundle):
    plain, explained = _post(tiny_mean_bundle, {"texts": TEXTS}, {"texts": TEXTS, "explain": True})
    assert plain.status_code == explained.status_code == 200
    clf = _classifier(tiny_mean_bundle, explained.json()["model"]["variant"])
    bias = clf.bundle.manifest["token_scores"]["bias"]
    recomputed = _independent_contributions(clf, TEXTS)
    for text, p, r, (z, c, rest) in zip(TEXTS, plain.json()["results"], explained.json()["results"], recomputed):
        assert {k: v for k, v in r.items() if k != "explanation"} == p
        e = r["explanation"]
        assert e["method"] == "decomposition" and e["spans"]
        assert sum(c.values()) + rest + bias == pytest.approx(z, abs=1e-3)
        prob = _sigmoid(z)
        assert prob == pytest.approx(r["spam_probability"], abs=1e-3)  # batch-mates may move int8 by ~1e-4
        want = {s: float(prob - _sigmoid(z - v)) for s, v in c.items()}
        for s in e["spans"]:
            assert s["text"] == text[s["start"]:s["end"]]
            assert s["effect"] == pytest.approx(want[(s["start"], s["end"])], abs=1e-6)
        shown = {(s["start"], s["end"]) for s in e["spans"]}
        ups = sorted((v for v in want.values() if v > 0), reverse=True)[:5]
        assert sorted((s["effect"] for s in e["spans"] if s["effect"] > 0), reverse=True) == pytest.approx(ups)
        assert len(shown) == len(e["spans"])
        assert [abs(s["effect"]) for s in e["spans"]] == sorted((abs(s["effect"]) for s in e["spans"]), reverse=True)


def test_offsets_through_the_normaliser_and_the_spans_are_the_units(tiny_mean_bundle):
    clf = _classifier(tiny_mean_bundle)
    text = TEXTS[2]
    att, = X.decompose_many([text], clf.encoder, clf.decompose, True)
    assert [text[a:b] for a, b in att.spans] == ["ＦＲＥＥ", "ｆ\u200bree", "ｍｏｎｅｙ", "&amp;", "prizes", "😀"]
    assert att.method == "decomposition" and att.rows == 1 and np.all(att.contributions != 0)
    # the emoji is one code point: its span is one index, the one after the space
    assert att.spans[-1] == (len(text) - 1, len(text))
    for t in TEXTS:
        att, = X.decompose_many([t], clf.encoder, clf.decompose, True)
        assert att.spans == X.units(t)


def test_tokens_map_back_through_head_tail_truncation_and_the_character_cap(tiny_mean_bundle):
    clf = _classifier(tiny_mean_bundle)
    assert clf.bundle.text.truncation == "head_tail"
    words = ["free", "prize", "click", "lunch", "meeting", "coffee", "music", "garden"]
    for n_words, over_cap in ((100, False), (400, True)):  # over 62 content tokens; over 12 x 64 characters
        text = " ".join(words[i % len(words)] for i in range(n_words)) + " END"
        norm, _ = normalize_with_offsets(text, True)
        assert (len(norm) > clf.encoder.char_cap) == over_cap
        (enc, offsets), = clf.encoder.encode_with_offsets([norm])
        assert enc.input_ids == clf.encoder.encode_batch([norm])[0].input_ids and enc.truncated
        assert offsets[0] is None and offsets[-1] is None
        for tid, off in zip(enc.input_ids[1:-1], offsets[1:-1]):
            piece = clf.encoder.tok.id_to_token(tid).replace("\u2581", "")
            assert off is not None and norm[off[0]:off[1]].strip() == piece, (piece, off)
        assert norm[offsets[-2][0]:offsets[-2][1]].strip() in ("END", "D")  # the tail is the text's end
        att, = X.decompose_many([text], clf.encoder, clf.decompose, True)
        middle = [c for (a, b), c in zip(att.spans, att.contributions) if 0.5 * len(text) < a < 0.7 * len(text)]
        assert middle and all(c == 0.0 for c in middle)  # dropped tokens contribute nothing
        assert att.contributions[0] != 0.0 and att.contributions[-1] != 0.0


def test_an_older_bundle_without_token_scores_is_explained_by_occlusion(tiny_mean_bundle, tmp_path):
    from serving.bundle import MANIFEST, write_manifest

    old = tmp_path / "old"
    shutil.copytree(tiny_mean_bundle, old)
    manifest = json.loads((old / MANIFEST).read_text(encoding="utf-8"))
    for key in ("outputs", "token_scores"):
        manifest.pop(key)
    manifest["parity"].pop("token_scores")
    write_manifest(old, manifest)  # an export from before: the same graphs, a manifest that lists no outputs
    clf = _classifier(old, "int8")
    assert clf.bundle.outputs == ["logits"] and not clf.has_token_scores
    res, = _post(old, {"texts": TEXTS[:2], "explain": True})
    assert res.status_code == 200
    score = X.onnx_scorer(clf)
    for text, r in zip(TEXTS, res.json()["results"]):
        assert r["explanation"]["method"] == "occlusion"
        want = X.explain(text, score)
        assert [(s["start"], s["end"]) for s in r["explanation"]["spans"]] == [(s["start"], s["end"]) for s in want["spans"]]


def test_explained_requests_keep_their_limits(tiny_mean_bundle):
    over, ok = _post(tiny_mean_bundle, {"texts": ["a", "b", "c"], "explain": True},
                     {"texts": [" ".join(["free prize click now"] * 10), "hi"], "explain": True},
                     explain_max_texts=2, explain_max_rows=4)
    assert over.status_code == 413 and over.json()["error"]["kind"] == "too_many_texts"
    spans = ok.json()["results"][0]["explanation"]["spans"]
    # no row cap for decomposition: spans are single words (the max_rows merge is occlusion's)
    assert ok.json()["results"][0]["explanation"]["method"] == "decomposition"
    assert spans and all(s["text"] in ("free", "prize", "click", "now") for s in spans)


# ------------------------------------------------------------------------------------------ make eval, bench


def test_eval_decomposition_matches_the_servers(tiny_mean_bundle, tiny_mean_model_dir, tmp_path):
    from training.error_report import write_report
    from training.evaluate import load_model as eval_model
    from training.modeling import token_scorer

    model, encoder, meta = eval_model(tiny_mean_model_dir)
    torch_att = X.decompose_many(TEXTS, encoder, token_scorer(model, encoder), True)
    clf = _classifier(tiny_mean_bundle)
    onnx_att = X.decompose_many(TEXTS, clf.encoder, clf.decompose, True)
    for a, b in zip(torch_att, onnx_att):
        assert a.spans == b.spans
        np.testing.assert_allclose(a.effects, b.effects, atol=1e-5)
    counts = write_report(tmp_path / "r.html", TEXTS, [0] * len(TEXTS), [0.9] * len(TEXTS), [0.5] * len(TEXTS),
                          ["en"] * len(TEXTS), ["s"] * len(TEXTS), score=None,
                          explain=lambda t: X.decompose_many([t], encoder, token_scorer(model, encoder), True)[0])
    assert counts["method"] == "decomposition" and counts["explained"] == len(TEXTS)


def test_bench_figure_quick_on_a_mean_pooled_bundle(tmp_path, tiny_mean_model_dir, tiny_mean_bundle):
    from test_explain import run_explain_bench

    res = run_explain_bench(tmp_path, tiny_mean_model_dir, tiny_mean_bundle)["result"]
    assert res["method"] == "decomposition" and set(res["deletion_by_method"]) == {"decomposition", "occlusion"}
    assert res["deletion"] == res["deletion_by_method"]["decomposition"]
    cost = res["cost"]
    assert cost["method"] == "decomposition" and cost["decomposition"]["mean_rows"] == 1.0
    assert cost["ratio_p50"] == cost["decomposition"]["ratio_p50"] == pytest.approx(
        cost["decomposition"]["p50_ms"] / cost["classify"]["p50_ms"])
    assert cost["request"]["ratio_p50"] > 0 and set(cost["explain"]) == {"32", "8", "4"}
    md = (tmp_path / "BENCH.md").read_text(encoding="utf-8")
    assert "Served method: **decomposition**" in md and "| decomposition | ko |" in md
