"""Ray job entrypoint: DINO self-supervised pretraining. Usage: python jobs/pretrain.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("pretrain")
