# uv comes from PyPI when the machine has none (python3 -m pip install uv).
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: install test demo bench lint

install:
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

test: install
	$(UV) run pytest -q -n auto

demo: install
	$(UV) run python examples/demo.py

bench: install
	$(UV) run python bench/kl_bench.py
	$(UV) run python bench/estimator_bench.py
	$(UV) run python bench/explode_bench.py
	$(UV) run python bench/score_bench.py
	$(UV) run python bench/report_bench.py
	$(UV) run python bench/openai_cost_bench.py
	$(UV) run python bench/batch_cost_bench.py
	$(UV) run python bench/cost_bench.py
	$(UV) run python bench/journal_bench.py

lint: install
	$(UV) run ruff check klstream tests bench examples
	$(UV) run ruff format --check klstream tests bench examples
	$(UV) run mypy --strict klstream tests
	$(UV) run lint-imports
