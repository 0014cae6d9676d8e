"""training/vocab.py: vocabulary trimming on the tiny backbone (segmentation, logits, coverage, per-script budgets,
the per-language resegmentation report), and on XLM-R's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from serving.text import Encoder, TextSettings
from test_backbone import HELDOUT_TEXTS, TRAIN_TEXTS, _logits
from training import vocab as V
from training.backbone import BackboneError, build_tiny, load_backbone, load_e5_tokenizer
from training.config import ModelConfig
from training.vocab import trim_vocabulary, unk_rate


# ------------------------------------------------------------------------------------------ trimming


def test_trimming_keeps_segmentation_logits_and_coverage():
    cfg = ModelConfig(backbone="tiny", tiny_hidden=32)
    full_model, full_tok, _ = load_backbone(cfg)
    model, tok, info = load_backbone(cfg, corpus_texts=TRAIN_TEXTS)
    report = info["vocab_trim"]

    # sizes: the embedding matrix matches the new vocabulary, and the report says what happened
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(tok) == tok.backend_tokenizer.get_vocab_size() == model.config.vocab_size
    assert report["pieces_kept"] == rows < report["pieces_before"] == 250002
    assert report["parameters_after"] == info["parameters"] < report["parameters_before"]
    assert report["heldout_texts"] >= 1

    # training texts: the same pieces (as strings) before and after, special tokens included
    for text in TRAIN_TEXTS:
        before, after = full_tok(text)["input_ids"], tok(text)["input_ids"]
        assert full_tok.convert_ids_to_tokens(before) == tok.convert_ids_to_tokens(after)
        assert after[0] == tok.convert_tokens_to_ids("<s>") and after[-1] == tok.convert_tokens_to_ids("</s>")
    # ... so the trimmed model computes exactly what the full one did
    assert torch.allclose(_logits(full_model, full_tok, TRAIN_TEXTS[:12]), _logits(model, tok, TRAIN_TEXTS[:12]),
                          atol=1e-6)

    # held-out text in the training languages: pieces the corpus never used, and still no more <unk>
    seen = set().union(*(full_tok.tokenize(t) for t in TRAIN_TEXTS))
    assert any(set(full_tok.tokenize(t)) - seen for t in HELDOUT_TEXTS)
    for text in HELDOUT_TEXTS:
        assert unk_rate(tok, [text]) <= unk_rate(full_tok, [text]), text
    assert report["heldout_unk_rate_after"] <= report["heldout_unk_rate_before"]


def test_trimmed_tokenizer_round_trips_and_serving_encoder_agrees(tmp_path):
    model, tok, _ = load_backbone(ModelConfig(backbone="tiny", tiny_hidden=32), corpus_texts=TRAIN_TEXTS)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert len(tok2) == len(tok) and model2.config.vocab_size == len(tok)
    texts = TRAIN_TEXTS[:6] + HELDOUT_TEXTS
    assert [tok2(t)["input_ids"] for t in texts] == [tok(t)["input_ids"] for t in texts]
    # serving wraps the saved tokenizer.json: the same ids as the transformers tokenizer
    enc = Encoder.from_file(str(tmp_path / "tokenizer.json"), TextSettings(max_length=512))
    assert [e.input_ids for e in enc.encode_batch(texts)] == [tok(t)["input_ids"] for t in texts]
    assert torch.allclose(_logits(model, tok, texts), _logits(model2, tok2, texts), atol=1e-6)


def test_trim_vocabulary_on_xlm_roberta_and_unk_rate():
    # another architecture (RoBERTa position ids depend on the padding id) through the public function
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    tok = load_e5_tokenizer()
    torch.manual_seed(0)
    model = XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32,
        max_position_embeddings=514, pad_token_id=tok.pad_token_id))
    before = _logits(model, tok, TRAIN_TEXTS[:8])
    model, small, report = trim_vocabulary(model, tok, TRAIN_TEXTS)
    assert torch.allclose(before, _logits(model, small, TRAIN_TEXTS[:8]), atol=1e-6)
    assert model.config.pad_token_id == small.pad_token_id == model.roberta.embeddings.padding_idx
    assert small.convert_ids_to_tokens(small.pad_token_id) == "<pad>"
    assert report["embedding_rows_after"] == len(small)
    # <unk>: a character no piece covers (a Linear B syllable) is <unk>, known text is not
    assert unk_rate(tok, ["hello world"]) == 0.0
    assert small("\U00010000", add_special_tokens=False)["input_ids"] == [small.convert_tokens_to_ids("\u2581"),
                                                                          small.unk_token_id]
    assert unk_rate(small, ["\U00010000"]) == 0.5
    assert 0.0 < unk_rate(tok.backend_tokenizer, ["hello \U00010000"]) < 1.0


# ------------------------------------------------------------------------------------------ script budgets

# Neither in TRAIN_TEXTS nor in the shipped reference text
UNSEEN_JA = "新しいスマホの予約は来週から始まります。"
UNSEEN_KO = "오늘 저녁 모임은 취소되었습니다."
NO_SCRIPTS = dict(trim_keep_han=0, trim_keep_kana=0, trim_keep_hangul=0, trim_keep_latin=0, trim_keep_symbols=0,
                  trim_keep_case_variants=False)


@pytest.fixture(scope="module")
def tiny8():
    """A function giving a fresh copy of one tiny backbone (hidden 8) and the untrimmed tokenizer."""
    import copy

    model, tok = build_tiny(ModelConfig(backbone="tiny", tiny_hidden=8, tiny_layers=1, tiny_heads=1))
    return lambda: (copy.deepcopy(model), tok)


def _pieces(tok, text):
    from serving.text import normalize

    return tok.backend_tokenizer.encode(normalize(text, mask_digits=True), add_special_tokens=False).tokens


@pytest.fixture(scope="module")
def trimmed(tiny8):
    """{"default" | "none": (model, tokenizer, report)} for the tiny backbone trimmed to TRAIN_TEXTS with the
    default script budgets and with all of them 0 (today's corpus-only trimming), plus the untrimmed one."""
    out = {"full": tiny8()}
    for name, cfg in (("default", ModelConfig()), ("none", ModelConfig(**NO_SCRIPTS))):
        out[name] = trim_vocabulary(*tiny8(), TRAIN_TEXTS, model_cfg=cfg)
    return out


def test_default_budgets_keep_unseen_japanese_and_korean_segmentation(trimmed):
    _, full = trimmed["full"]
    model, tok, report = trimmed["default"]
    for text in (UNSEEN_JA, UNSEEN_KO, *HELDOUT_TEXTS[1:5]):
        assert _pieces(tok, text) == _pieces(full, text), text
    assert _pieces(tok, UNSEEN_KO)[:3] == ["▁오늘", "▁저녁", "▁모"]
    # the embedding matrix matches the tokenizer, and every CJK piece of the vocabulary is kept
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(tok) == report["pieces_kept"] == model.config.vocab_size
    kept, before = report["pieces_kept_per_script"], report["pieces_per_script_before"]
    assert all(kept[s] == before[s] > 3000 for s in ("han", "kana", "hangul"))
    assert kept["symbols"] == before["symbols"] > 300
    assert kept["latin"] < before["latin"] and report["pieces_added_by_scripts"] > 15000
    assert sum(kept.values()) == report["pieces_kept"]
    assert report["embedding_parameters"] == report["pieces_kept"] * 8
    assert report["embedding_int8_mb"] == pytest.approx(report["pieces_kept"] * 8 / 1e6)
    assert report["int8_mb_estimate"] == pytest.approx(report["parameters_after"] / 1e6)


def test_report_has_per_language_resegmentation_of_the_reference_text(trimmed):
    default, none = trimmed["default"][2]["reference_resegmented"], trimmed["none"][2]["reference_resegmented"]
    for lang in ("zh", "ja", "ko", "en"):
        assert default[lang]["messages"] == none[lang]["messages"] >= 40
        assert default[lang]["resegmented"] <= none[lang]["resegmented"]
        assert default[lang]["resegmented_share"] == default[lang]["resegmented"] / default[lang]["messages"]
    # every CJK piece is kept: what changes in zh/ja messages is their Latin words ("App", "URL"), which
    # these few English training texts do not have (the default corpora do: 0% there)
    assert default["ko"]["resegmented_share"] == 0.0
    assert default["zh"]["resegmented"] <= 1 and default["ja"]["resegmented"] <= 1
    # corpus-only trimming cuts nearly every Japanese and Korean message into other pieces
    assert none["ja"]["resegmented_share"] > 0.9 and none["ko"]["resegmented_share"] > 0.9


def test_budgets_of_zero_are_the_corpus_only_trimming(trimmed):
    _, full = trimmed["full"]
    model, tok, report = trimmed["none"]
    spec = json.loads(full.backend_tokenizer.to_str())
    used = V._used_ids(full.backend_tokenizer, [t for t in TRAIN_TEXTS if t])
    expected = {spec["model"]["vocab"][i][0] for i in V._base_ids(spec) | used}
    assert set(tok.get_vocab()) == expected
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(expected)
    assert report["pieces_added_by_scripts"] == report["pieces_added_as_case_variants"] == 0
    # ... which cuts unseen Japanese and Korean into single characters
    assert _pieces(tok, UNSEEN_JA) != _pieces(full, UNSEEN_JA)
    assert _pieces(tok, UNSEEN_KO)[:4] == ["▁오", "늘", "▁저", "녁"]


def test_partial_budgets_keep_the_best_scored_pieces_and_case_variants(tiny8):
    model, tok = tiny8()
    spec = json.loads(tok.backend_tokenizer.to_str())
    cfg = ModelConfig(**dict(NO_SCRIPTS, trim_keep_kana=100, trim_keep_case_variants=True))
    model, small, report = trim_vocabulary(model, tok, ["heavy rain"], model_cfg=cfg)
    scripts = V._piece_scripts(spec)
    kana = sorted((-s, p) for (p, s), script in zip(spec["model"]["vocab"], scripts) if script == "kana")
    vocab = small.get_vocab()
    assert all(p in vocab for _, p in kana[:100]) and not any(p in vocab for _, p in kana[100:])
    assert report["pieces_kept_per_script"]["kana"] == 100 and report["keep_per_script"]["kana"] == 100
    # "▁Heavy" and "▁Rain" come with the corpus's "▁heavy" and "▁rain" (XLM-R has no "▁HEAVY")
    assert {"▁heavy", "▁Heavy", "▁rain", "▁Rain"} <= set(vocab)
    assert report["pieces_added_as_case_variants"] == 2
    assert _pieces(small, "Heavy Rain") == _pieces(tok, "Heavy Rain") == ["▁Heavy", "▁Rain"]
    assert model.get_input_embeddings().weight.shape[0] == len(small)


@pytest.mark.parametrize("piece, script", [
    ("▁무료", "hangul"), ("ください", "kana"), ("受け取", "kana"), ("明日", "han"), ("人々", "han"),
    ("▁free", "latin"), ("xxx", "latin"), ("!!", "symbols"), ("。」", "symbols"), ("▁2023年", None),
    ("▁10", None), ("a", None), ("▁가", None), ("▁iPhone", "latin"), ("Aé", "latin"), ("▁ok.", None),
    ("ों", None), ("▁Москва", None),
])
def test_piece_script(piece, script):
    assert V.piece_script(piece) == script


def test_trim_report_files_are_measured_per_language_and_checked(tmp_path, tiny8):
    jsonl = tmp_path / "ood.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "label": 1}, ensure_ascii=False)
                               for t in (UNSEEN_JA, UNSEEN_KO, "see you tomorrow")) + "\n\n", encoding="utf-8")
    csv_file = tmp_path / "ood.csv"
    csv_file.write_text("id,text\n1,周末一起去爬山吗？\n2,\"hello, world\"\n", encoding="utf-8")
    cfg = ModelConfig(**dict(NO_SCRIPTS, trim_report_files=[str(jsonl), str(csv_file)]))
    model, tok = tiny8()
    _, _, report = trim_vocabulary(model, tok, TRAIN_TEXTS, model_cfg=cfg)
    by_file = report["report_files_resegmented"]
    assert by_file[str(jsonl)]["ja"] == {"messages": 1, "resegmented": 1, "resegmented_share": 1.0}
    assert by_file[str(jsonl)]["ko"]["resegmented"] == 1 and by_file[str(jsonl)]["en"]["messages"] == 1
    assert by_file[str(jsonl)]["zh"] == {"messages": 0, "resegmented": 0, "resegmented_share": None}
    assert by_file[str(csv_file)]["zh"]["messages"] == by_file[str(csv_file)]["en"]["messages"] == 1

    for bad, message in (([str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
                         ([str(tmp_path / "ood.txt")], "ood.txt does not exist")):
        with pytest.raises(BackboneError, match=message):
            trim_vocabulary(model, tok, TRAIN_TEXTS, model_cfg=ModelConfig(trim_report_files=bad))
    (tmp_path / "notext.csv").write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(BackboneError, match="no 'text' column"):
        V.read_reference_texts(tmp_path / "notext.csv")
    with pytest.raises(BackboneError, match="model.trim_keep_latin must be -1"):
        trim_vocabulary(model, tok, TRAIN_TEXTS, model_cfg=ModelConfig(trim_keep_latin=-2))


def test_shipped_reference_text_covers_the_served_languages():
    from serving.text import language_tag, normalize

    texts = V.read_reference_texts(V.REFERENCE_FILE)
    tags = [language_tag(normalize(t, mask_digits=True)) for t in texts]
    assert all(30 <= tags.count(lang) <= 60 for lang in ("zh", "ja", "ko", "en"))
    assert not set(texts) & set(TRAIN_TEXTS + HELDOUT_TEXTS)
