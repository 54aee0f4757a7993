"""ptqkit: reconstruction-based post-training quantization on one MQBench backend.

One import namespace, in layers that only import downwards:

    ptqkit.errors, .schema, .cache, .distributed,    plain utilities (.precision: float32 or bfloat16
      .precision                                      reconstruction, runtime.compute_dtype)
    ptqkit.quant                                      the quantizer backend: fused kernels, fake quantizers,
                                                      observers, insertion (MQBench) and calibration, their state
    ptqkit.models, ptqkit.data                        model zoo and checkpoints; images and splits
    ptqkit.algorithms                                 the reconstruction engine, then one module per method
    ptqkit.config, .pipeline, .saving                 a whole run from a config
    ptqkit.cli (ptq_main.py), ptqkit.tools            the commands

A source checkout keeps `algorithms/`, `data/`, `models/` and `tools/` at the top of the repository, the layout its
users asked for; setuptools installs them as ptqkit.algorithms, ... (setup.cfg `package_dir`), and from the
checkout itself this package finds them beside its own folder.
"""
import os as _os

_ROOT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "algorithms")) and \
        _os.path.isfile(_os.path.join(_ROOT, "ptq_main.py")) and _os.path.isdir(_os.path.join(_ROOT, "algorithms")):
    __path__.append(_ROOT)   # the checkout: ptqkit.algorithms is <repo>/algorithms, and so on
