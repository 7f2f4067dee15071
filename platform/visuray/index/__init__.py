"""The catalog index: batch embedding with Ray Data (:mod:`.embed`), embedding ensembles (:mod:`.ensemble`),
FAISS build/publish/search (:mod:`.faiss_index`), the ``build_index`` job (:mod:`.build`) and models
evaluated on a catalog (:mod:`.evaluate`). It builds on the models and the task packages' predictors
(:mod:`visuray.predictors`); serving builds on it. Submodules import faiss, torch and ray inside functions,
so importing this package is cheap."""
