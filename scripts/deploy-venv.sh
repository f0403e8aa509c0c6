# Sourced: the venv under target/ with Helm's engine (helm-python-sdk), kubernetes-validate,
# checkov and a CEL engine (cel-python, for the chart's admission policy), installed on first
# use; sets $venv.
venv=target/deploy-venv
if ! "$venv/bin/python" -c 'import helm_python, celpy' >/dev/null 2>&1 || [ ! -x "$venv/bin/checkov" ] \
  || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "installing helm-python-sdk, kubernetes-validate and checkov into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    'helm-python-sdk>=0.2,<0.3' 'kubernetes-validate>=1.37' 'checkov>=3,<4' 'cel-python>=0.5,<0.6'
fi
