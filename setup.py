from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="llava_loop",
    version="0.2.0",
    description="A plain-PyTorch training loop for finetuning LLaVA and other Hugging Face VLMs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["llava_loop", "llava_loop.*"]),
    # published chat templates of the test kit; accelerate launch configs (llava-loop launch-config)
    package_data={"llava_loop": ["testing_templates/*.jinja", "launch_configs/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.17",
        "accelerate>=1.0",
        "rouge-score>=0.1.2",
        "bert-score>=0.3.13",
        "sacrebleu>=2.3",
        "pillow>=10",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "tokenizers>=0.23",
        "huggingface_hub>=0.23",
        "psutil>=5.8",
        "pyyaml>=6",
        "jsonargparse[signatures]>=4.40",
        "docstring-parser>=0.15",  # LoopConfig field docstrings (also a jsonargparse[signatures] dependency)
        "numpy",
        "matplotlib>=3.7",
        "regex>=2022.1",  # the COCO caption tokenizer (cider): longest-match rules (POSIX mode)
        "rapidfuzz>=3.0",  # Levenshtein distances (anls)
    ],
    extras_require={
        "test": ["pytest>=7", "ruff>=0.5", "sentencepiece>=0.2", "protobuf>=4", "pytest-markdown-docs>=0.9",
                 "markdown-it-py>=3", "packaging>=21", "evaluate>=0.4", "pandas",  # pandas: bert-score's reader
                 "num2words",  # SmolVLM's processor (tests/test_families.py)
                 "datasets>=3.0",  # Hugging Face datasets as input, llava-loop convert (tests/test_hf_datasets.py)
                 "pycocoevalcap>=1.2", "anls>=0.0.2",  # references of cider and anls (tests/test_metrics_caption_ocr.py)
                 "llava_loop[notebooks]",  # tests/test_notebooks.py runs notebooks/ in a Jupyter kernel
                 "llava_loop[docs]",  # tests/test_docs_site.py builds the site
                 "selenium>=4.11",  # drives headless Chromium (tests/test_report_browser.py)
                 # tests/test_trackers.py; wandb 0.31 for `wandb-core leet inspect`, the offline reader it uses
                 "llava_loop[trackers]", "wandb>=0.31",
                 "llava_loop[quantization]",  # QLoRA, 8-bit optimizers, quantized export run on the CPU in CI
                 "llava_loop[deepspeed]"],  # ZeRO-2/3 in 2 gloo processes (tests/test_distributed.py)
        "evaluate": ["evaluate>=0.4", "datasets>=2.0"],  # metrics given as evaluate.load(...) modules
        "datasets": ["datasets>=3.0"],  # llava-loop convert / to_llava_json (a datasets.Dataset input needs no extra)
        # report_to: docs/logging.md (trackio: 0.43's Markdown and auto_log_cpu; mlflow 3: SQLite store default)
        "trackers": ["tensorboard>=2.15", "wandb>=0.18", "mlflow>=3.0", "trackio>=0.43", "aim>=3.17"],
        # Running notebooks/ (and tests/test_notebooks.py): a Jupyter kernel, nbclient; ipywidgets for tqdm's
        # notebook bars (without it tqdm.auto warns "IProgress not found" in every notebook that trains);
        # datasets for finetune_custom_dataset.ipynb (a Hub dataset converted with to_llava_json).
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "jupyter_client>=8", "ipykernel>=6.29", "ipywidgets>=8",
                      "datasets>=3.0"],
        # The documentation site (mkdocs.yml); tests/test_docs_site.py builds it with --strict.
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5", "mkdocstrings[python]>=1.0"],
        # QLoRA / 8-bit training, 8-bit optimizers, nf4/int8 export (bitsandbytes)
        "quantization": ["bitsandbytes>=0.45"],
        # export --quantize int4-weight-only (torchao; CUDA only, so not in the test extra)
        "int4": ["torchao>=0.12"],
        # DeepSpeed ZeRO-2/3 (docs/multi_gpu.md); 0.19.8 is a source archive, built without ops (DS_BUILD_OPS=0,
        # the default): DeepSpeed compiles what it needs when first used
        "deepspeed": ["deepspeed>=0.19.8"],
        "gpu": ["llava_loop[quantization]"],  # the former name
    },
    entry_points={"console_scripts": ["llava-loop=llava_loop.cli:main"]},
)
