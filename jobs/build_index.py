"""Ray job entrypoint: embed a catalog and build a FAISS index. Usage: python jobs/build_index.py SPEC.yaml [key=value ...]"""

from visuray.cli import job_script_main

if __name__ == "__main__":
    job_script_main("build_index")
