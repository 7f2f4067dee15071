"""Ray job entrypoint: a hyperparameter sweep of a training job with Ray Tune. Usage: python jobs/sweep.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("sweep")
