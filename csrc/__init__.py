"""CUDA C++ sources of the backend="cuda" fallback (data for the JIT build)."""
