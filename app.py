"""DeepSeek-V3 MoE playground: `python app.py`, then open http://127.0.0.1:7860.

Importing this module builds the page but neither launches it nor touches CUDA.
Settings (all optional, from the environment): see ui/settings.py and the README.
"""

try:  # Hugging Face ZeroGPU Spaces want `spaces` imported before torch
    import spaces  # noqa: F401
except ImportError:
    pass

from ui import settings
from ui.layout import build_demo, launch_kwargs

demo = build_demo()

if __name__ == "__main__":
    demo.launch(
        server_name=settings.HOST,
        server_port=settings.PORT,
        prevent_thread_lock=True,
        **launch_kwargs(),
    )
    # The page is up; load torch and the model code now rather than at the first click.
    import ui.runtime  # noqa: F401, E402

    demo.block_thread()
