"""Ray job entrypoint: multi-label attribute model. Usage: python jobs/train_attributes.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("train_attributes")
