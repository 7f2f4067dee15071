"""Ray job entrypoint: metric fine-tuning of an embedding model. Usage: python jobs/finetune.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("finetune")
