"""training/evasion.py: deterministic perturbations, and the ones the shared normaliser undoes."""

from __future__ import annotations

import random

import pytest

from serving.text import normalize
from training.evasion import PERTURBATIONS, UNDONE_BY_NORMALISER, perturb

SPAM = ["WIN a FREE iphone now! Click http://win-prize.com/claim to get your reward",
        "恭喜您中奖了！点击链接 www.prize-cn.top 领取大奖，请联系客服",
        "무료 쿠폰 지급! 지금 바로 클릭하세요 http://coupon.kr/a",
        "おめでとうございます！当選しました。今すぐクリック http://jp-gift.xyz"]


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_same_seed_same_output_other_seed_other_output(name):
    a = perturb(SPAM, name, seed=3)
    assert a == perturb(SPAM, name, seed=3)
    assert any(x != y for x, y in zip(a, SPAM)), f"{name} changed none of the messages"
    if name not in ("zh_traditional",):  # the conversion is a table: no randomness in it
        assert any(perturb(SPAM, name, seed=s) != a for s in range(4, 10))


def test_each_perturbation_does_what_it_says():
    rng = lambda: random.Random(0)  # noqa: E731
    url = PERTURBATIONS["split_url"]("go to http://a.com now", rng())
    assert "http://a.com" not in url and any(tok in url for tok in ("[.]", " . ", " dot ", "hxxp"))
    assert PERTURBATIONS["zh_traditional"]("恭喜您中奖了，点击链接领取", rng()) == "恭喜您中獎了，點擊鏈接領取"
    # Chinese only: Japanese and Korean text keep their characters
    assert PERTURBATIONS["zh_traditional"]("おめでとうございます！当選しました", rng()) == "おめでとうございます！当選しました"
    assert any(ord(c) > 0xFF00 for c in PERTURBATIONS["fullwidth"]("FREE money", rng()))
    assert any(c in "\u200b\u200c\u200d\u2060\ufeff" for c in PERTURBATIONS["zero_width"]("free money now", rng()))
    leet = PERTURBATIONS["leetspeak"]("free tickets also", rng())
    assert any(c.isdigit() for c in leet)
    glyphs = PERTURBATIONS["homoglyph"]("free access", rng())
    assert glyphs != "free access" and glyphs.isascii() is False


@pytest.mark.parametrize("name", UNDONE_BY_NORMALISER)
def test_the_normaliser_undoes_the_cosmetic_ones(name):
    for seed in range(5):
        for text in SPAM:
            assert normalize(perturb([text], name, seed)[0]) == normalize(text), (name, seed, text)


def test_letter_spacing_of_latin_words_is_joined_back():
    spaced = "call F R E E now"
    assert normalize(spaced) == "call FREE now"
