"""Ray job entrypoint: composed-retrieval training (image + text). Usage: python jobs/train_fusion.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("train_fusion")
