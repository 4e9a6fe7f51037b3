import subprocess
import sys

import tdgen.prefetch as prefetch


def test_prefetch_imports_the_model_stack_once(monkeypatch):
    monkeypatch.setenv("TDGEN_PREFETCH", "1")
    monkeypatch.setattr(prefetch, "_started", None)
    t = prefetch.start_model_imports()
    assert t is not None and t.daemon
    assert prefetch.start_model_imports() is t  # once per process
    t.join(120)
    assert not t.is_alive()
    assert "diffusers" in sys.modules and "transformers" in sys.modules


def test_prefetch_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("TDGEN_PREFETCH", "0")
    monkeypatch.setattr(prefetch, "_started", None)
    assert prefetch.start_model_imports() is None
    assert prefetch._started is None


def test_a_failing_background_import_stays_silent():
    # A broken diffusers must not print from the thread; the main thread reports it itself.
    code = ("import sys; sys.modules['diffusers'] = None\n"
            "import tdgen.prefetch as p; p.start_model_imports().join(120); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and r.stderr == ""
