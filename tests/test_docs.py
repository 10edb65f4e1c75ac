"""The repository documents its own semantics (docs/dms.md) and the code cites it, never a file
outside the repository; the set-up commands a new user copies select the CPU torch wheel and
say how to simulate devices for a mesh."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_CPU = "--extra-index-url https://download.pytorch.org/whl/cpu"


def read(*path):
    with open(os.path.join(REPO, *path)) as f:
        return f.read()


def source_files():
    """Every Python file and the README, this test file excepted."""
    yield "README.md"
    for top in ("dms_jax", "tests", "benchmarks", "scripts", "configs", "."):
        for root, dirs, names in os.walk(os.path.join(REPO, top)):
            if top == ".":
                dirs[:] = []
            for name in names:
                path = os.path.relpath(os.path.join(root, name), REPO)
                if name.endswith(".py") and path != os.path.join("tests", "test_docs.py"):
                    yield path


def test_code_cites_docs_dms_md_sections_that_exist():
    sections = set(re.findall(r"^## (\d+)\. ", read("docs", "dms.md"), re.M))
    assert sections >= {str(n) for n in range(1, 10)}
    cited = 0
    for name in source_files():
        text = read(name)
        assert "dms-spec" not in text, name  # a file outside the repository
        for first, last in re.findall(r"docs/dms\.md sections? (\d+)(?:-(\d+))?", text):
            cited += 1
            assert first in sections and (not last or last in sections), (name, first, last)
    assert cited >= 18


def test_readme_and_ci_install_the_cpu_torch_wheel_the_same_way():
    readme, ci = read("README.md"), read(".ci", "run")
    for text in (readme, ci):
        assert re.search(re.escape(TORCH_CPU) + r' "?torch==2\.13\.0', text), text[:300]


def test_readme_mesh_examples_say_how_to_simulate_devices_on_a_cpu():
    lines = read("README.md").splitlines()
    found = 0
    for before, line in zip([""] + lines, lines):
        if "mesh.shape=\"(2,2,2)\"" in line:  # the 8-device example: its command says how
            found += 1
            assert "XLA_FLAGS=--xla_force_host_platform_device_count=8" in before + line, line
    assert found
