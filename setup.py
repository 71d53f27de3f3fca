"""llada_jax: masked-diffusion language models (LLaDA, LLaDA-V) in JAX/Flax."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "importlib_resources==7.1.0",  # tfds looks it up for builders defined in packages
]

setup(
    name="llada_jax",
    version="0.1.0",
    description="JAX/Flax framework for masked-diffusion language models (LLaDA, LLaDA-V)",
    packages=find_packages(include=["llada_jax", "llada_jax.*"]),
    python_requires=">=3.11",  # jax, flax, orbax and grain need 3.11
    install_requires=RUNTIME,
    extras_require={
        # The CPU wheel of torch is pinned: an unpinned torch pulls several GB of CUDA packages.
        "test": ["pytest==9.2.0", "torch==2.13.0", "transformers==5.23.0", "jinja2==3.1.6",
                 "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
                 "matplotlib==3.11.2", "lm_eval==0.4.13", "fastapi==0.165.0",
                 "uvicorn==0.54.0", "openai==3.57.0", "import-linter==2.17",
                 "pytest-xdist==3.8.0"],
        "torch": ["torch==2.13.0", "transformers==5.23.0"],
        # Benchmarks through lm-evaluation-harness (llada_jax.evaluation, launch/evaluate.py).
        "eval": ["lm_eval==0.4.13"],
        # The OpenAI-compatible server (launch/serve.py).
        "serve": ["fastapi==0.165.0", "uvicorn==0.54.0"],
        # TPU VMs: the TPU build of the pinned jax, and gcsfs for gs:// workdirs.
        "tpu": ["jax[tpu]==0.10.2", "gcsfs==2026.10.1"],
        "notebooks": ["matplotlib==3.11.2", "nbclient==0.11.0", "nbformat==5.11.1",
                      "ipykernel==7.4.0"],
    },
)
