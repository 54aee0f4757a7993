"""Methods from outside the package: a config's `custom_imports`, installed packages' entry points, and the
example method of docs/NEW_METHOD.md run end to end from a folder outside the repository."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ASSETS, REPO, base_tree
from ptqkit.algorithms import registry
from ptqkit.config import validate
from ptqkit.errors import ConfigError

pytestmark = pytest.mark.cifar10

EXAMPLE = os.path.join(REPO, "examples", "custom_method")


def write(path, text):
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))


@pytest.mark.parametrize("module,message", [
    ("no_such_module_here", r"^config key 'custom_imports': expected a module found in the config's folder, the "
                            r"working directory or the Python path, got 'no_such_module_here'$"),
    ("broken_plugin_mod", r"^config key 'custom_imports': expected a module that imports cleanly \(ZeroDivisionError: "
                          r"division by zero\), got 'broken_plugin_mod'$"),
    ("needs_missing_dep", r"^config key 'custom_imports': expected a module that imports cleanly "
                          r"\(ModuleNotFoundError: No module named 'not_installed_dep'\)"),
])
def test_custom_imports_that_fail_say_which_module_and_why_in_one_line(tmp_path, module, message):
    write(tmp_path / "broken_plugin_mod.py", "x = 1 / 0\n")
    write(tmp_path / "needs_missing_dep.py", "import not_installed_dep\n")
    with pytest.raises(ConfigError, match=message):
        validate(base_tree(custom_imports=[module]), [str(tmp_path)])
    assert str(tmp_path) not in sys.path                    # the search folder is not left on the import path
    with pytest.raises(ConfigError, match=r"^config key 'custom_imports': expected a list of module names"):
        validate(base_tree(custom_imports="channel_stats"))


def test_a_module_beside_the_config_registers_a_method_usable_by_name(tmp_path):
    shutil.copy(os.path.join(EXAMPLE, "channel_stats.py"), tmp_path / "channel_stats.py")
    cfg = validate(base_tree(custom_imports=["channel_stats"], algorithm={"name": "qdrop_stats", "stats_weight": 0.5}),
                   [str(tmp_path)])
    assert cfg.algorithm.name == "qdrop_stats" and cfg.algorithm.stats_weight == 0.5
    assert cfg.algorithm.prob == 0.5                        # the rest is QDrop's
    assert "channel_stats" in registry.registered_terms()
    with pytest.raises(ConfigError, match=r"^config key 'algorithm\.stats_weight': expected a value >= 0\.0, got -1\.0$"):
        validate(base_tree(custom_imports=["channel_stats"], algorithm={"name": "qdrop_stats", "stats_weight": -1}),
                 [str(tmp_path)])


def test_an_installed_packages_entry_point_registers_its_method(tmp_path, monkeypatch):
    """A package advertising `ptqkit.plugins = ...` in its metadata is loaded the first time a name is missing."""
    write(tmp_path / "ep_methods.py", """
        from ptqkit.algorithms.qdrop import QDrop
        from ptqkit.algorithms.registry import register

        @register("qdrop_from_entry_point")
        class FromEntryPoint(QDrop):
            pass
    """)
    dist = tmp_path / "ep_methods-0.1.dist-info"
    dist.mkdir()
    write(dist / "METADATA", "Metadata-Version: 2.1\nName: ep-methods\nVersion: 0.1\n")
    write(dist / "entry_points.txt", "[ptqkit.plugins]\nep_methods = ep_methods\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert registry.get_algorithm("qdrop_from_entry_point").__module__ == "ep_methods"
    finally:
        registry._ALGORITHMS.pop("qdrop_from_entry_point", None)
        sys.modules.pop("ep_methods", None)


@pytest.mark.slow
def test_the_example_method_runs_end_to_end_from_a_folder_outside_the_repository(tmp_path):
    """docs/NEW_METHOD.md's example: its file and a config in a folder of the user's, `ptq_main.py` run from there,
    on the assets' ResNet-20 (short budget); its term shows in the loss history of every unit it applies to."""
    work = tmp_path / "my_project"
    work.mkdir()
    shutil.copy(os.path.join(EXAMPLE, "channel_stats.py"), work / "channel_stats.py")
    base = os.path.join(REPO, "configs", "_base_", "cifar10_resnet20.yaml")
    write(work / "w4a4.yaml", f"""
        _base_: {base}
        custom_imports: [channel_stats]
        model: {{checkpoint: {os.path.join(ASSETS, 'cifar10', 'resnet20-12fca82f.th')}}}
        data:
          root: {os.path.join(ASSETS, 'cifar10')}
          calibration: {{num_images: 128}}
          evaluation: {{limit: 1000, workers: 0}}
        algorithm: {{name: qdrop_stats, stats_weight: 1.0, iters: 20, batch_size: 32, act_init_images: 64}}
        runtime: {{output_dir: out, save_model: false, threads: 2}}
    """)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "ptq_main.py"), "--config", "w4a4.yaml", "--quiet"],
                          cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.load(open(work / "out" / "results.json"))
    assert results["algorithm"] == "qdrop_stats"
    units = results["algorithm_results"]["units"]
    # every unit whose output has channels over positions: layer3.2's unit ends after the global pooling
    assert all(len(u["history"]["stats"]) > 0 for u in units[:-2])
    assert "stats" not in units[-1]["history"]
    assert results["fp32"]["images"] == results["quant"]["images"] == 1000
    assert results["quant"]["top1"] > results["fp32"]["top1"] - 6.0, results["quant"]
