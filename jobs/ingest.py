"""Ray job entrypoint: ingest images into a Parquet catalog. Usage: python jobs/ingest.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("ingest")
