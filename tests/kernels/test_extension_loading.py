"""Loading the csrc extension: prebuilt module, else built on first use into the cache folder."""

from __future__ import annotations

import ast
import sys
import types
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from fedhello.kernels import extension


@pytest.fixture
def not_prebuilt(monkeypatch, tmp_path):
    """The cpu extension as if ``pip install -e .`` had not built it; a fresh cache folder."""
    monkeypatch.setitem(extension._NATIVE_MODULES, "cpu", "fedhello._no_prebuilt_extension")
    monkeypatch.setattr(extension, "_cache", {})
    monkeypatch.setattr(extension, "_errors", {})
    monkeypatch.setenv("FEDHELLO_CACHE", str(tmp_path))
    monkeypatch.delenv("FEDHELLO_BUILD_EXT", raising=False)
    # Any existing executable passes the "is there a C++ compiler" check: the builds are faked.
    monkeypatch.setenv("CXX", sys.executable)
    return tmp_path


def test_built_on_first_use_into_the_cache(not_prebuilt, monkeypatch):
    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        return types.ModuleType(kwargs["name"])

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    first = extension.backend("cpu")
    assert first is not None and first.native.__name__ == "fedhello_C_cpu" and first.NAME == "cpu"
    assert extension.backend("cpu") is first and len(calls) == 1  # once per process
    (call,) = calls
    assert Path(call["build_directory"]).is_relative_to(not_prebuilt / "extensions")
    assert [Path(s).name for s in call["sources"]] == ["multi_lora_cpu.cpp", "shrink_expand.cpp", "weight_grad.cpp"]
    assert all(Path(s).is_file() for s in call["sources"])
    assert extension.load_error("cpu") is None


def test_cuda_is_not_built_on_first_use(not_prebuilt, monkeypatch):
    monkeypatch.setitem(extension._NATIVE_MODULES, "cuda", "fedhello._no_prebuilt_cuda")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("must not build CUDA on first use"))
    assert extension.backend("cuda") is None
    assert "python -m fedhello.kernels.extension build cuda" in extension.load_error("cuda")


def test_cuda_built_on_request_is_loaded_on_first_use(not_prebuilt, monkeypatch):
    monkeypatch.setitem(extension._NATIVE_MODULES, "cuda", "fedhello._no_prebuilt_cuda")
    monkeypatch.setattr(extension.torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    calls = []

    def fake_load(**kwargs):  # what cpp_extension.load leaves behind: the library in the build folder
        calls.append(kwargs)
        Path(kwargs["build_directory"], f"{kwargs['name']}.so").touch()
        return types.ModuleType(kwargs["name"])

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert extension.main(["build", "cuda"]) == 0
    (call,) = calls
    assert [Path(s).name for s in call["sources"]] == ["multi_lora_cuda.cpp", "multi_lora_kernels.cu",
                                                       "shrink_expand.cu", "weight_grad.cu"]
    assert all(Path(s).is_file() for s in call["sources"]) and "-O3" in call["extra_cuda_cflags"]
    assert Path(call["build_directory"]).is_relative_to(not_prebuilt / "extensions")
    loaded = extension.backend("cuda")  # a new process would now load the cached build
    assert loaded is not None and loaded.NAME == "cuda" and len(calls) == 2


def test_build_cuda_names_what_is_missing(not_prebuilt, monkeypatch, capsys):
    monkeypatch.setattr(extension.torch.version, "cuda", None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("must not build"))
    assert extension.main(["build", "cuda"]) == 1
    assert "is a CPU build" in capsys.readouterr().err
    monkeypatch.setattr(extension.torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    with pytest.raises(ImportError, match="nvcc not found"):
        extension.build("cuda")
    with pytest.raises(ValueError, match="device_type"):
        extension.build("rocm")


@pytest.mark.parametrize("env, reason", [({"FEDHELLO_BUILD_EXT": "0"}, "FEDHELLO_BUILD_EXT=0"),
                                         ({"CXX": "/no/such/compiler"}, "no C++ compiler")])
def test_not_built_when_disabled_or_without_a_compiler(not_prebuilt, monkeypatch, env, reason):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("must not build"))
    assert extension.backend("cpu") is None
    error = extension.load_error("cpu")
    assert "fedhello._no_prebuilt_extension" in error and reason in error


def test_a_failing_build_leaves_the_backend_absent(not_prebuilt, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("Error building extension 'fedhello_C_cpu'")

    monkeypatch.setattr(cpp_extension, "load", broken)
    assert extension.backend("cpu") is None
    assert "building it failed: RuntimeError" in extension.load_error("cpu")


def _setup_py_sources() -> dict[str, list[str]]:
    """CPU_SOURCES and CUDA_SOURCES as setup.py writes them (it cannot be imported: it runs setup())."""
    tree = ast.parse((extension._CSRC.parent / "setup.py").read_text())
    lists = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
             and node.targets[0].id in ("CPU_SOURCES", "CUDA_SOURCES")}
    return {"cpu": lists["CPU_SOURCES"], "cuda": lists["CUDA_SOURCES"]}


@pytest.mark.parametrize("device_type, suffixes", [("cpu", {".cpp"}), ("cuda", {".cpp", ".cu"})])
def test_install_and_first_use_build_every_source(device_type, suffixes):
    folder = extension._CSRC / device_type
    on_disk = sorted(f"{device_type}/{path.name}" for path in folder.iterdir() if path.suffix in suffixes)
    assert sorted(extension._JIT_SOURCES[device_type]) == on_disk
    assert _setup_py_sources()[device_type] == [f"csrc/{name}" for name in extension._JIT_SOURCES[device_type]]
