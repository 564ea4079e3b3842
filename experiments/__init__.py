"""The experiment scripts, run from the repository root as modules: `python -m experiments.NAME`.

Each script's docstring says what it measures and where it writes (experiments/results/);
experiments/common.py holds what they share. Importing a script runs nothing and leaves sys.path
as it is (tests/test_experiments_package.py).
"""
