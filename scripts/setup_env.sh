# Sourced by scripts/*.sh: make .venv in the checkout when missing and install the package into it.
# Reinstalls when setup.py changes (a stamp file records the setup.py it was built from).
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.effnetv2_jax_installed
if [ ! -f "$stamp" ] || ! cmp -s setup.py "$stamp"; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  cp setup.py "$stamp"
fi
