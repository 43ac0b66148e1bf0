"""The package installs as `adaptermix.*` only, and never shadows (or is shadowed by) other top-level names."""

import os
import subprocess
import sys
import zipfile


TOP_LEVEL = ("library", "kernels", "composer", "routers", "conf")


def run_python(code: str, cwd, extra_path=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_imports_outside_the_repo_without_shadowing_other_top_level_packages(tmp_path):
    for name in TOP_LEVEL:
        (tmp_path / f"{name}.py").write_text(f"MARK = 'theirs:{name}'\n")
    code = (
        "import adaptermix, adaptermix.kernels as ours, adaptermix.library as lib\n"
        "import kernels, composer, library, routers, conf\n"
        "assert kernels.MARK == 'theirs:kernels' and composer.MARK == 'theirs:composer', kernels\n"
        "assert library.MARK == 'theirs:library' and conf.MARK == 'theirs:conf'\n"
        "assert ours.__name__ == 'adaptermix.kernels' and lib.AdapterLibrary is adaptermix.AdapterLibrary\n"
        "print(adaptermix.__file__)\n"
    )
    result = run_python(code, cwd=tmp_path, extra_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) not in result.stdout


def test_no_top_level_module_is_installed(tmp_path):
    code = "import importlib.util as u; print([n for n in %r if u.find_spec(n)])" % (TOP_LEVEL,)
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_wheel_holds_only_adaptermix_and_installs(tmp_path, h):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(h.repo), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("adaptermix-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"adaptermix", wheel.name.split("-py")[0] + ".dist-info"}
    for expected in ("adaptermix/library/store.py", "adaptermix/kernels/__init__.py",
                     "adaptermix/conf/config.yaml", "adaptermix/conf/library/default.yaml", "adaptermix/cli.py",
                     "adaptermix/kernels/cpu_mixture.cpp"):
        assert expected in names
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel),
                              "-q"], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    result = run_python("import adaptermix, adaptermix.library.store; print(adaptermix.__file__)",
                        cwd=tmp_path, extra_path=target)
    assert result.returncode == 0 and result.stdout.startswith(str(target)), result.stdout + result.stderr


def test_hydra_config_ships_as_package_data():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="adaptermix.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["search.k=3", "library.nprobe=8"])
    assert cfg.search.k == 3 and cfg.library.nprobe == 8
    assert cfg.library.encoder._target_ == "adaptermix.library.SentenceTransformerEncoder"


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "adaptermix")
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "build" in result.stdout and "search" in result.stdout


def test_every_router_config_instantiates():
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    import adaptermix as am

    configs = {"arrow": "arrow", "retrieval": "retrieval", "retrieval_lexical": "retrieval", "moe_gate": "moe_gate",
               "token_level": "token_level", "per_sequence": "per_sequence", "sequence_arrow": "sequence_arrow",
               "hybrid_confidence": "hybrid", "sequence_arrow_generic": "sequence_arrow"}
    for config, name in configs.items():
        with initialize_config_module(config_module="adaptermix.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"router={config}"])
        router = instantiate(cfg.router)
        assert isinstance(router, am.Router) and router.name == name


def test_a_checkout_root_on_sys_path_cannot_clobber_the_registered_ops(h, tmp_path):
    """transformers probes for Hugging Face's `kernels` package with find_spec + import_module; with the repo
    root on sys.path that finds our `kernels/` folder. It must stay inert, or re-defining the custom ops would
    destroy the real registration (a crash at the next call)."""
    code = (
        "import sys, importlib\n"
        "import adaptermix.kernels.mixture as mixture\n"
        "from torch._library.custom_ops import OPDEFS\n"
        f"sys.path.insert(0, {str(h.repo)!r})\n"
        "probe = importlib.import_module('kernels')\n"
        "assert probe.__file__.startswith(sys.path[0]) and not hasattr(probe, 'lora_mixture'), probe\n"
        "for name in ('library', 'routers', 'composer'):\n"
        "    importlib.import_module(name)\n"
        "assert OPDEFS['adaptermix::lora_mixture'] is mixture._mixture_op\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert is_kernels_available() is False\n"
        "print('ok')\n"
    )
    result = run_python(code, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
