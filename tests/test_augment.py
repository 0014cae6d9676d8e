"""training/augment.py: copies of training rows through an evasion perturbation, per label, seeded."""

from __future__ import annotations

import pytest
from datasets import Dataset

from training.augment import augment_rows, check
from training.config import ConfigError
from training.data import _features

ZH_SPAM = ["恭喜您中奖了，点击链接领取", "贷款无抵押当天放款请联系", "澳门赌场在线开户送彩金", "发票代开请联系我们"]
ZH_HAM = ["明天开会记得带电脑", "这家饭馆的面条很好吃", "我们周末去公园散步吧", "银行卡已经还款了谢谢"]
OTHER = ["おめでとうございます！当選しました", "무료 쿠폰 지급", "see you at noon", "恭喜發財"]  # nothing to convert


def rows() -> Dataset:
    texts = ZH_SPAM + ZH_HAM + OTHER
    labels = [1] * 4 + [0] * 4 + [1, 1, 0, 0]
    n = len(texts)
    return Dataset.from_dict({"id": [f"r{i}" for i in range(n)], "text": texts, "label": labels,
                              "source": ["s"] * n, "channel": ["sms"] * n, "lang": ["zh"] * n,
                              "group": list(range(n))}, features=_features())


def test_copies_a_share_of_the_changed_rows_of_each_label_after_the_originals():
    ds = rows()
    out = augment_rows(ds, {"zh_traditional": 0.5}, seed=1)
    assert out.features == ds.features
    assert out["text"][:len(ds)] == ds["text"]  # the originals first, untouched
    added = out.select(range(len(ds), len(out)))
    assert len(added) == 4 and sorted(added["label"]) == [0, 0, 1, 1]  # half of the 4 changed rows per label
    by_id = dict(zip(ds["id"], ds["text"]))
    for row in added:
        original = by_id[row["id"].removesuffix("+zh_traditional")]
        assert row["id"].endswith("+zh_traditional") and original in ZH_SPAM + ZH_HAM
        assert row["text"] != original and len(row["text"]) == len(original)  # one character for one
    # deterministic per seed; another seed picks other rows
    assert augment_rows(ds, {"zh_traditional": 0.5}, seed=1)["id"] == out["id"]
    assert any(augment_rows(ds, {"zh_traditional": 0.5}, seed=s)["id"] != out["id"] for s in range(2, 8))


def test_every_changed_row_at_share_one_and_none_without_shares():
    ds = rows()
    out = augment_rows(ds, {"zh_traditional": 1.0}, seed=1)
    assert len(out) == len(ds) + 8
    assert "恭喜您中獎了，點擊鏈接領取" in out["text"] and "明天開會記得帶電腦" in out["text"]
    assert augment_rows(ds, {}, seed=1) is ds


@pytest.mark.parametrize("shares, message", [
    ({"zh_simplified": 0.3}, "no perturbation 'zh_simplified'"),
    ({"fullwidth": 0.3}, "the shared normaliser undoes it"),
    ({"zh_traditional": 0.0}, "must be in (0, 1]"),
    ({"zh_traditional": 1.5}, "must be in (0, 1]"),
])
def test_bad_shares_are_config_errors(shares, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check(shares)
