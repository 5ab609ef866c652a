"""expert_t5x: expert language models on the JAX / T5X / SeqIO stack."""

import setuptools

# Exact pins: the newest set that installs together on CPython 3.11 (jax>=0.11 and
# flax>=0.12.9 require Python 3.12). TensorFlow's minor version must equal tensorflow-text's.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorstore==0.1.86",
    "numpy>=2.0,<3",
    "gin-config==0.5.0",
    "clu==0.0.12",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "jinja2>=3.1,<4",
    "pyyaml>=6,<7",
    "rouge-score==0.1.2",
    "sacrebleu==2.5.1",
    "bm25s==0.3.16",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "tensorboard==2.21.0",
]

EXTRAS_REQUIRE = {
    # fiddle and cached-property: imported by upstream T5X, which the bridge tests run; ruff: the
    # line-width and pyflakes check that tests/run.sh runs first (settings in ruff.toml).
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "fiddle==0.3.1", "cached-property==2.0.1",
             "ruff==0.17.5"],
    # Reference implementations, only for parity tests and benchmarks (CPU PyTorch).
    "parity": ["torch==2.13.0", "transformers==5.23.0", "sentence-transformers==6.2.0",
               "bert-score==0.3.13"],
    "cuda": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
}

setuptools.setup(
    name="expert_t5x",
    version="0.1.0",
    description="Expert language models (Jang et al., ICML 2023) on JAX / T5X / SeqIO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(
        include=["expert_t5x", "expert_t5x.*", "seqio_tasks", "seqio_tasks.*"]) +
    ["expert_t5x.gin_configs"],
    # The top-level gin/ folder ships inside the package as expert_t5x/gin_configs.
    package_dir={"expert_t5x.gin_configs": "gin"},
    package_data={
        "expert_t5x.gin_configs": ["**/*.gin", "**/*.json"], "expert_t5x": ["data/*.json"],
        "seqio_tasks": ["data/**/*"]
    },
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["expert-t5x = expert_t5x.cli:main"]},
)
