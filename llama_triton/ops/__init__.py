"""Public ops: torch.library custom ops over the Triton launchers, with autograd, fake (meta) impls for
torch.compile, and backend dispatch (llama_triton.backend). One module per op family
(``llama_triton.ops.rms_norm`` defines ``rms_norm``, ...). The user-facing names are re-exported lazily by
``llama_triton/__init__.py``; this package imports nothing, so each family is loaded only when used."""
