"""Shared fixtures: a tiny trained model directory (DESIGN §3) and the bundle exported from it (§5).

`tiny_model_dir` (session): the `tiny` backbone (cls pooling) (random 2-layer BERT with the e5 tokenizer) trained for a
few dozen steps on templated spam/ham messages in zh/ja/ko/en, so its validation logits sit far from
the threshold; beside it a prepared dataset (train/validation/test, §1 columns) that spamlingo.json's
data_dir points at. `tiny_bundle` (session): `training.export.export_bundle` of that model into a
temporary bundles/ root; the fixture's value is the bundle directory (a Path). `tiny_mean_model_dir` and
`tiny_mean_bundle`: the same with model.pooling=mean, whose graph has the token_scores output.

Both are built once per test session (about 15 s on 2 cores) and must not be modified by tests: copy
them first (`shutil.copytree`) to tamper with files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

try:  # the dataset fixtures save and load small datasets: no progress bars in test output
    import datasets

    datasets.disable_progress_bars()
except ImportError:  # pragma: no cover
    pass

TINY_MAX_LENGTH = 64

# Templates per language; {x} takes a filler word so rows differ. Spam carries the usual cues (prize,
# link, urgency), ham is everyday talk: a 2-layer model separates them after a few dozen steps.
TEMPLATES = {
    "en": {
        1: ["WIN a FREE {x} now! Click http://win.example.com to claim your prize",
            "URGENT: your account is locked, verify at http://bank-secure.example.net {x}",
            "Congratulations! You have been selected for a cash reward, reply {x} to claim",
            "Cheap {x} pills, no prescription, order today and save 80%"],
        0: ["Are we still meeting for {x} tomorrow at noon?",
            "Thanks for the notes from today's {x} meeting, see you Monday",
            "Can you pick up some {x} on your way home?",
            "The {x} report is attached, let me know if anything is missing"],
    },
    "zh": {
        1: ["恭喜您中奖了!点击链接领取{x}大奖,限时优惠",
            "您的账户存在风险,请立即登录网站验证{x},否则将被冻结",
            "特价{x}促销,全场五折,回复TD退订",
            "免费领取{x}会员,添加微信即可获得现金红包"],
        0: ["明天{x}的会议改到下午三点,请准时参加",
            "我已经到{x}了,你什么时候过来?",
            "周末一起去{x}吃饭吧,我请客",
            "妈妈说{x}已经准备好了,早点回家"],
    },
    "ja": {
        1: ["おめでとうございます!{x}が当選しました。今すぐこちらをクリックして受け取ってください",
            "【緊急】お客様のアカウントが停止されました。{x}で本人確認をしてください",
            "無料で{x}をプレゼント中!今すぐ登録して現金をゲット",
            "限定セール{x}が九割引き、今日だけのチャンスです"],
        0: ["明日の{x}は何時に集合しますか?",
            "昨日は{x}をありがとうございました。とても楽しかったです",
            "{x}の資料を送りましたので、確認をお願いします",
            "今日は{x}で晩ご飯を食べてから帰ります"],
    },
    "ko": {
        1: ["축하합니다! {x} 당첨되셨습니다. 지금 링크를 눌러 상품을 받으세요",
            "[긴급] 고객님의 계좌가 정지되었습니다. {x} 에서 본인 인증을 해주세요",
            "무료 {x} 이벤트! 지금 가입하면 현금 지급",
            "대출 {x} 최저 금리 보장, 지금 바로 상담 신청하세요"],
        0: ["내일 {x} 몇 시에 만날까요?",
            "어제 {x} 정말 고마웠어요. 다음에 또 봐요",
            "{x} 자료 보내드렸으니 확인 부탁드립니다",
            "오늘 저녁은 {x} 에서 먹고 들어갈게요"],
    },
}
FILLERS = {
    "en": ["iphone", "lunch", "budget", "coffee", "laptop", "project", "bread", "tickets", "garden", "music"],
    "zh": ["手机", "公司", "火锅", "北京", "家里", "礼品", "学校", "超市", "电影", "蛋糕"],
    "ja": ["旅行", "東京", "会議", "ランチ", "商品券", "映画", "駅", "カフェ", "本", "ケーキ"],
    "ko": ["여행", "서울", "회의", "점심", "상품권", "영화", "카페", "책", "케이크", "학교"],
}


def tiny_rows(seed: int = 0, per_template: int = 4) -> list[dict]:
    """Deterministic labelled rows: every template with `per_template` fillers, ids unique."""
    from serving.text import language_tag, normalize

    rng = random.Random(seed)
    rows = []
    for lang, by_label in TEMPLATES.items():
        for label, templates in by_label.items():
            for t_i, template in enumerate(templates):
                for x in rng.sample(FILLERS[lang], per_template):
                    text = normalize(template.format(x=x), mask_digits=True)
                    rows.append({"id": f"tiny_{lang}:{len(rows)}", "text": text, "label": label,
                                 "source": f"tiny_{lang}", "channel": "sms", "lang": language_tag(text),
                                 "group": len(rows)})
    rng.shuffle(rows)
    return rows


def write_tiny_dataset(directory: Path, seed: int = 0) -> Path:
    """A prepared-data directory (DESIGN §1) with train/validation/test splits of templated rows."""
    from datasets import Dataset, DatasetDict

    rows = tiny_rows(seed, per_template=6)
    n = len(rows)
    splits = {"train": rows[: n // 2], "validation": rows[n // 2: 3 * n // 4], "test": rows[3 * n // 4:]}
    DatasetDict({k: Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(directory / "dataset"))
    (directory / "manifest.json").write_text(json.dumps({
        "dataset_hash": "tiny-test-fixture",
        "splits": {k: {"rows": len(v)} for k, v in splits.items()},
    }), encoding="utf-8")
    return directory


def train_tiny_model(model_dir: Path, data_dir: Path, truncation: str = "head_tail", steps: int = 30,
                     pooling: str = "cls") -> Path:
    """The tiny backbone trained for `steps` full-batch AdamW steps; written as a model directory (§3)."""
    import torch
    from datasets import load_from_disk

    from serving.text import NORMALIZER_VERSION, Encoder, TextSettings
    from training.backbone import load_backbone
    from training.config import ModelConfig

    ds = load_from_disk(str(data_dir / "dataset"))
    texts, labels = list(ds["train"]["text"]), list(ds["train"]["label"])
    # Embeddings train too: with the vocabulary trimmed to these texts they are small, and it takes the
    # loss to ~0.03 in 30 steps (frozen random embeddings leave the scores bunched near 0.1 and 0.8).
    mcfg = ModelConfig(backbone="tiny", max_length=TINY_MAX_LENGTH, truncation=truncation, dropout=0.0,
                       freeze_embeddings=False, pooling=pooling)
    corpus = texts + list(ds["validation"]["text"]) + list(ds["test"]["text"])
    torch.manual_seed(0)  # the random initialisation too: the same model whichever tests ran before
    model, tokenizer, _info = load_backbone(mcfg, corpus_texts=corpus)
    settings = TextSettings(mask_digits=True, max_length=TINY_MAX_LENGTH, truncation=truncation,
                            normalizer_version=NORMALIZER_VERSION)  # as training.train records it
    encoder = Encoder(tokenizer.backend_tokenizer, settings)
    ids, mask = encoder.pad(encoder.encode_batch(texts))
    x, m, y = torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor(labels)
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads, and on a busy machine
    try:  # two spinning threads made a step 15x slower than one
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(input_ids=x, attention_mask=m).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").exists():
        tokenizer.backend_tokenizer.save(str(model_dir / "tokenizer.json"))
    meta = {
        "format_version": 1, "labels": ["ham", "spam"], "text": settings.to_dict(), "threshold": 0.5,
        "threshold_rule": "fixed (test fixture)", "target_fpr": 0.01, "backbone": "tiny", "mlflow_run_id": None,
        "data_dir": str(data_dir), "data_hash": "tiny-test-fixture",
        "metrics": {"train/loss": float(loss.detach())},
    }
    (model_dir / "spamlingo.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return model_dir


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_data_dir) -> Path:
    """A trained-model directory (DESIGN §3) of the tiny backbone: runs/tiny/model/ in a temp root."""
    root = tmp_path_factory.mktemp("tiny_run")
    return train_tiny_model(root / "runs" / "tiny" / "model", tiny_data_dir)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_dir) -> Path:
    """The bundle directory (DESIGN §5) exported from `tiny_model_dir` (fp32 + int8 when its gate passes)."""
    from training.config import Config
    from training.export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    return export_bundle(Config(), tiny_model_dir, out_root=root, name="tiny", show=False, threads=1).bundle_dir


@pytest.fixture(scope="session")
def tiny_mean_model_dir(tmp_path_factory, tiny_data_dir) -> Path:
    """`tiny_model_dir` with model.pooling=mean (the default config's head): its bundle has token_scores."""
    root = tmp_path_factory.mktemp("tiny_mean_run")
    return train_tiny_model(root / "runs" / "tiny_mean" / "model", tiny_data_dir, pooling="mean")


@pytest.fixture(scope="session")
def tiny_mean_bundle(tmp_path_factory, tiny_mean_model_dir) -> Path:
    """The bundle of `tiny_mean_model_dir`: logits and token_scores outputs (training/token_scores.py)."""
    from training.config import Config
    from training.export import export_bundle

    root = tmp_path_factory.mktemp("mean_bundles")
    return export_bundle(Config(), tiny_mean_model_dir, out_root=root, name="tiny_mean", show=False,
                         threads=1).bundle_dir


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store per test module (creating its tables takes seconds); tests use their own
    experiment names."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root
