"""Deploy time: loading artifacts, the one onnxruntime session factory (``runtime``), the pipeline
executor, serving (HTTP, Triton), tokenizers and generation. Imports only the bottom layer
(``tfgraph.ir``, ``errors``, ``ops``, ``providers``, ``signature``, ``analysis``) and itself, so a
service that loads an artifact never imports the compiler (tests/test_layers.py)."""
