"""`trisect serve` makes idle OpenMP workers sleep unless the user chose a wait policy."""
import os
import subprocess
import sys

from services.serve import passive_omp_workers


def test_sets_passive_when_unset(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert passive_omp_workers()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_explicit_choice_wins(monkeypatch):
    for var, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        monkeypatch.setenv(var, value)
        assert not passive_omp_workers()
        assert os.environ[var] == value
        assert ("OMP_WAIT_POLICY" in os.environ) == (var == "OMP_WAIT_POLICY")


def test_serve_entry_sets_it_before_torch_loads():
    # the policy only counts if libgomp has not been loaded yet when serve's main sets it
    code = ("import sys, os; from services import serve; serve.passive_omp_workers(); "
            "print('torch' in sys.modules, os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "PASSIVE"]
