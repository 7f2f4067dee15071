"""The catalog index: batch embedding with Ray Data (:mod:`.embed`), FAISS build/publish/search
(:mod:`.faiss_index`) and the ``build_index`` job (:mod:`.build`). Submodules import faiss, torch and
ray inside functions, so importing this package is cheap."""
