"""One distribution, ``switchkd``; the top-level folders install as its subpackages.

rollout/ -> switchkd.rollout, trainer/ -> switchkd.trainer, cluster/ -> switchkd.cluster, each with
its sub-packages (rollout/engines/ -> switchkd.rollout.engines, ...).
``switchkd`` itself is a namespace package (no __init__), so nothing at the repo root
shadows the installed names.
"""
from setuptools import find_packages, setup

PACKAGE_DIRS = {"switchkd.rollout": "rollout", "switchkd.trainer": "trainer", "switchkd.cluster": "cluster"}
PACKAGES = [name for root, folder in PACKAGE_DIRS.items()
            for name in [root, *(f"{root}.{sub}" for sub in find_packages(folder))]]

setup(
    name="switchkd",
    version="0.1.0",
    description="SWITCH knowledge distillation of LLMs on vLLM rollouts and DeepSpeed ZeRO",
    python_requires=">=3.11,<3.12",
    packages=PACKAGES,
    package_dir=PACKAGE_DIRS,
    entry_points={
        "console_scripts": ["switchkd = switchkd.cluster.cli:main"],
        # the teacher server's binary rows endpoint; vLLM loads it only where VLLM_PLUGINS names it
        "vllm.endpoint_plugins": ["switchkd_rows = switchkd.rollout.engines.teacher_plugin:RowsEndpoint"],
    },
    # Runtime pins live in requirements/cpu.txt (and gpu.txt): torch must be installed first,
    # alone, from its CPU wheel, so setup.py does not declare it and pip never pulls a CUDA build.
    install_requires=[],
)
