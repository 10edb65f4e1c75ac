"""Test set-up: 8 simulated CPU devices and full float32 matmul precision, set before JAX starts;
a persistent compilation cache for the session; tiny random Hugging Face models (built with
transformers, saved locally) as session fixtures."""
import os
import shutil
import tempfile

# LLVM's -O0 and XLA's elemental (pre-"fusion emitter") kernel generator for the tests'
# programs: they are tiny, so compiling them is most of the suite's time (a tiny model's prefill
# program: 6.6 s -> 4.3 s with -O0; a 3-layer prefill 1.5-2.0 s -> 1.0 s with the elemental
# emitter, the whole suite 11.9 -> 7.3 min); the tests check results, not speed, and XLA's graph
# passes (fusion, layout) still run. Users' programs compile with XLA's defaults.
os.environ.setdefault("XLA_FLAGS",
                      "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests compile the same programs (the same tiny shapes through the trainer, generate and the
# CLIs, in this process and in the subprocesses the CLI tests start, which inherit these): one
# on-disk cache for the session lets each compile once. A fresh directory per session, so a run
# never reads another run's programs.
_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE_DIR = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dms_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_model_dirs(tmp_path_factory):
    """{family: directory} of tiny random HF models saved with save_pretrained (built once)."""
    root = tmp_path_factory.mktemp("hf_models")
    return {name: hf_models.build(name, str(root / name)) for name in hf_models.FAMILIES}


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each module's compiled programs when it ends: the suite compiles a few thousand, and a
    long-lived process holding all of them once crashed inside an XLA compile late in the run."""
    yield
    jax.clear_caches()


def pytest_unconfigure(config):
    """The session's compilation cache goes with it (only the process that made it removes it)."""
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
