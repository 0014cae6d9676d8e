"""serving/text.py: normalisation, language tags and the Encoder's truncation policies (real tokenizer)."""

from __future__ import annotations

import pytest

from serving.text import NORMALIZER_VERSION, Encoder, TextSettings, language_tag, normalize


# ------------------------------------------------------------------------------------------ normalize


def test_full_width_becomes_half_width():
    assert normalize("ＦＲＥＥ　ｍｏｎｅｙ！") == "FREE money!"
    assert normalize("１２３４５") == "12345"
    # half-width katakana is a compatibility form too: it becomes the standard full-width katakana
    assert normalize("ｶﾀｶﾅ") == "カタカナ"


def test_zero_width_and_controls_removed():
    assert normalize("f\u200br\u200ce\u200de\ufeff") == "free"
    assert normalize("soft\u00adhyphen") == "softhyphen"
    # a control character separates words rather than gluing them together
    assert normalize("ab\tcd\x00ef\r\ngh") == "ab cd ef gh"


def test_lookalike_letters_inside_latin_words_are_folded():
    # Cyrillic е and о inside English words: the word reads as Latin to the tokenizer afterwards
    assert normalize("Frее mоney") == "Free money"
    # a word wholly in Cyrillic is a Cyrillic word, not an evasion
    assert normalize("Привет мир") == "Привет мир"


def test_letter_by_letter_spacing_is_joined():
    assert normalize("call F R E E now") == "call FREE now"
    assert normalize("免 费 领 取 大奖") == "免费领取 大奖"
    assert normalize("무 료 쿠 폰") == "무료쿠폰"
    # three single letters or words of several letters stay as they are
    assert normalize("a b c") == "a b c"
    assert normalize("I am a student") == "I am a student"


def test_whitespace_collapsed_and_html_entities_decoded():
    assert normalize("  hello \n\n  world  ") == "hello world"
    assert normalize("&lt;#&gt; &amp; more") == "<#> & more"


@pytest.mark.parametrize("text", ["您好您的快递已到请点击链接领取", "日本語のテスト、です。", "대출 한도 조회 무료"])
def test_cjk_untouched(text):
    assert normalize(text) == text


def test_full_width_punctuation_folded_but_ideographs_kept():
    # the full-width comma is a compatibility form; the ideographic comma and full stop are not
    assert normalize("您好，请点击。") == "您好,请点击。"


def test_digit_masking():
    assert normalize("Call 0800 123 now", mask_digits=True) == "Call xxxx xxx now"
    assert normalize("Call 0800 123 now", mask_digits=False) == "Call 0800 123 now"
    # full-width digits are folded first, then masked like ASCII ones
    assert normalize("電話０１２", mask_digits=True) == "電話xxx"
    # the Chinese corpus ships digits already masked as x: masking elsewhere makes them look alike
    assert normalize("x月x日 特价", mask_digits=True) == normalize("3月8日 特价", mask_digits=True)


def test_normalize_is_idempotent():
    for t in ["ＦＲＥＥ　１２３ｆ\u200bｒｅｅ &amp;", "  a\tb  ", "【楽天】ｶｰﾄﾞ"]:
        once = normalize(t, mask_digits=True)
        assert normalize(once, mask_digits=True) == once


# ------------------------------------------------------------------------------------------ language_tag


@pytest.mark.parametrize(
    "text, lang",
    [
        # Chinese
        ("您好，您的快递已到，请点击链接领取", "zh"),
        ("【招商银行】尊敬的客户，您的信用卡额度已提升至xxxxx元，回复TD退订", "zh"),
        # Japanese spam-like messages: kana marks Japanese even with many kanji
        ("【楽天】お客様のアカウントが一時停止されました。こちらから確認してください", "ja"),
        ("今すぐ登録で1万円プレゼント！期間限定のキャンペーンです", "ja"),
        ("ご利用料金の未払いがあります。本日中にご連絡ください", "ja"),
        # Korean spam-like messages
        ("[광고] 대출 한도 조회 무료! 지금 바로 신청하세요", "ko"),
        ("축하합니다 이벤트에 당첨되셨습니다 링크를 눌러 확인하세요", "ko"),
        # English
        ("Free entry in 2 a wkly comp to win FA Cup final tkts", "en"),
        ("Ok lar... Joking wif u oni...", "en"),
        # mixed: CJK and Latin letters each carry a real share of the text
        ("免费领取最新款手机 click here now", "mixed"),
        ("限时优惠 limited offer today only", "mixed"),
        # no letters at all, or another script
        ("12345 !!! ???", "other"),
        ("Привет, как дела?", "other"),
    ],
)
def test_language_tags(text, lang):
    assert language_tag(text) == lang


def test_language_tag_after_normalisation():
    # full-width Latin spam is still English once normalised
    assert language_tag(normalize("ＷＩＮ　ＡＮ　ｉＰｈｏｎｅ　ＮＯＷ")) == "en"
    # half-width katakana is still Japanese
    assert language_tag(normalize("ｾｰﾙ開催中")) == "ja"


# ------------------------------------------------------------------------------------------ Encoder


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    from training.backbone import e5_tokenizer_file

    return Tokenizer.from_file(str(e5_tokenizer_file()))


LONG = " ".join(f"word{i} spam offer number {i}" for i in range(200))


def _content(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_head_truncation(tokenizer):
    enc = Encoder(tokenizer, TextSettings(max_length=32, truncation="head"))
    (e,) = enc.encode_batch([LONG])
    assert e.truncated
    assert len(e.input_ids) == 32
    assert e.input_ids[0] == enc.cls_id and e.input_ids[-1] == enc.sep_id
    assert e.input_ids[1:-1] == _content(tokenizer, LONG)[:30]


def test_head_tail_truncation(tokenizer):
    text = "win a prize " * 5 + "middle " * 50 + "call 0800 now to claim"
    enc = Encoder(tokenizer, TextSettings(max_length=32, truncation="head_tail", head_tokens=10))
    (e,) = enc.encode_batch([text])
    full = _content(tokenizer, text)
    assert e.truncated and len(e.input_ids) == 32
    assert e.input_ids[1:11] == full[:10]
    assert e.input_ids[11:-1] == full[-20:]  # the call to action at the end survives
    # default head: two thirds of the content budget
    enc2 = Encoder(tokenizer, TextSettings(max_length=32, truncation="head_tail"))
    (e2,) = enc2.encode_batch([text])
    assert enc2.head == 20
    assert e2.input_ids[1:21] == full[:20] and e2.input_ids[21:-1] == full[-10:]


def test_head_tail_keeps_tail_of_very_long_text(tokenizer):
    # beyond the character cap the middle is cut before tokenising; the tail must still be the real tail
    text = LONG * 20 + " unsubscribe at example dot com"
    enc = Encoder(tokenizer, TextSettings(max_length=32, truncation="head_tail", head_tokens=8))
    assert len(text) > enc.char_cap
    (e,) = enc.encode_batch([text])
    tail = _content(tokenizer, "word199 spam offer number 199 unsubscribe at example dot com")
    assert e.truncated and e.input_ids[-1] == enc.sep_id
    assert e.input_ids[-1 - len(tail):-1] == tail
    (h,) = Encoder(tokenizer, TextSettings(max_length=32)).encode_batch([text])
    assert h.input_ids[1:-1] == _content(tokenizer, LONG)[:30]


def test_short_text_not_truncated_and_dynamic_padding(tokenizer):
    enc = Encoder(tokenizer, TextSettings(max_length=32, truncation="head_tail"))
    a, b = enc.encode_batch(["hello", "free money now, click here"])
    assert not a.truncated and not b.truncated
    assert a.input_ids == [enc.cls_id, *_content(tokenizer, "hello"), enc.sep_id]
    ids, mask = enc.pad([a, b])
    assert ids.shape == mask.shape == (2, len(b.input_ids))  # padded to the longest, not to max_length
    assert mask[0].sum() == len(a.input_ids) and mask[1].all()
    assert (ids[0, len(a.input_ids):] == enc.pad_id).all()


def test_text_settings_validation_and_round_trip():
    s = TextSettings(mask_digits=False, max_length=64, truncation="head_tail", head_tokens=20)
    assert TextSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="truncation"):
        TextSettings(truncation="tail")
    with pytest.raises(ValueError, match="max_length"):
        TextSettings(max_length=4)
    # head_tokens beyond the content budget (max_length - 2) or negative: rejected up front, not at Encoder
    assert TextSettings(max_length=64, truncation="head_tail", head_tokens=62).head_tokens == 62
    with pytest.raises(ValueError, match="head_tokens"):
        TextSettings(max_length=64, truncation="head_tail", head_tokens=63)
    with pytest.raises(ValueError, match="head_tokens"):
        TextSettings(head_tokens=-1)
    # the normaliser version a model was trained with: carried through, compared with this code's
    v = TextSettings(normalizer_version=NORMALIZER_VERSION - 1)
    assert TextSettings.from_dict(v.to_dict()) == v and "version" in v.normalizer_mismatch()
    assert TextSettings(normalizer_version=NORMALIZER_VERSION).normalizer_mismatch() is None
    assert TextSettings.from_dict({"max_length": 64}).normalizer_mismatch() is None  # older: not recorded


def test_masked_digits_do_not_make_cjk_text_mixed():
    # a Chinese transaction notice full of amounts: after masking, the x's are not Latin letters
    alert = normalize("您尾号8841的储蓄卡12月02日14:25支出人民币3,280.00元，余额12,539.61元", mask_digits=True)
    assert "x" in alert and language_tag(alert) == "zh"
    assert language_tag(normalize("인증번호 [482913] 타인에게 알려주지 마세요 1588-1234", mask_digits=True)) == "ko"
    assert language_tag("box of xylophones") == "en"


def test_normalising_twice_changes_nothing():
    # digits spaced out among single letters: masking makes them letters, and the join sees them once
    for text in ["call 5 0 a b now", "x 1 2 3 y", "c ^ e ^ l 1 2 3 4 pills", "F R E E 1 0 0"]:
        once = normalize(text, mask_digits=True)
        assert normalize(once, mask_digits=True) == once, text
