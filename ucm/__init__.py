"""UCM: the user-facing package. Re-exports at the import paths the tuning guide documents, and the ``ucm`` command.

The implementation lives in ``ucm_kernels`` (Triton kernels), ``ucm_store`` (tiered block store) and
``ucm_sparse`` (GSA block-sparse decode); nothing here holds logic of its own.
"""
