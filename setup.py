"""rskd-jax: distil remote-sensing multimodal LLMs (GeoChat-13B -> 7B style) in JAX/Flax NNX."""

from setuptools import find_packages, setup

# The tested stack (see ../shared/reference/env-probe.md). torch is ALWAYS pinned: an unpinned torch
# pulls a multi-GB CUDA build.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "tensorboardX==2.6.5",  # TensorBoard event files (train/writers.py); no TensorFlow or tensorboard
    "shapely==2.2.0",  # rotated-box IoU (eval/boxes.py)
    "rouge-score==0.1.2",  # ROUGE for the demo's report (METEOR needs the `eval` extra + Java)
    "absl-py==2.5.1",
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
]

EXTRAS = {
    "test": [
        "fastapi==0.165.0",  # the web demo (as `serve`), driven in Debian's chromium by selenium
        "uvicorn==0.55.0",
        "selenium==4.51.0",
        "pytest==9.0.3",
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        "peft==0.21.2",  # reference for LoRA merging (tests)
        "accelerate==1.15.0",
        "nbclient==0.11.0",
        "nbformat==5.11.1",
        "ipykernel==7.4.0",
        "ruff==0.17.6",
    ],
    "eval": ["pycocoevalcap==1.2", "nltk==3.10.4"],
    "plan": ["libtpu==0.0.42.1"],
    # NVIDIA GPUs (docs/gpu.md): the CUDA 12 build of the tested jax; the plugin brings CUDA/cuDNN/NCCL wheels.
    "cuda": ["jax[cuda12]==0.10.2", "jax-cuda12-plugin[with-cuda]==0.10.2", "jax-cuda12-pjrt==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],  # TPU VMs (docs/tpu.md)
    "torch": ["torch==2.13.0"],
    # the web demo (launch/serve.py); not Gradio: its releases pin Pillow < 13, below the pin above
    "serve": ["fastapi==0.165.0", "uvicorn==0.55.0"],
}

setup(
    name="rskd-jax",
    version="0.1.0",
    description="Remote-sensing multimodal LLM distillation (GeoChat-13B -> 7B) in JAX/Flax NNX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rskd_jax", "rskd_jax.*", "launch", "configs"]),
    package_data={"rskd_jax.serve": ["static/*.html"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "rskd-train=launch.train:run",
            "rskd-convert=launch.convert:run",
            "rskd-eval=launch.eval:run",
            "rskd-plan=launch.plan:run",
            "rskd-chat=launch.chat:run",
            "rskd-predict=launch.predict:run",
            "rskd-serve=launch.serve:run",
        ]
    },
)
