"""DeepSeek-V3 MoE playground: `python app.py`, then open http://127.0.0.1:7860.

Importing this module builds the page but neither launches it nor touches CUDA.
Environment: GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, DSV3_AUTH="user:pass" (optional login),
DSV3_BROWSER_SECRET, DSV3_MEMORY_LIMIT, DSV3_EXPORT_LIMIT, DSV3_IMPORT_LIMIT, DSV3_SESSION_TTL.
"""

import os

try:  # Hugging Face ZeroGPU Spaces want `spaces` imported before torch
    import spaces  # noqa: F401
except ImportError:
    pass

from ui.layout import build_demo, launch_kwargs

demo = build_demo()

if __name__ == "__main__":
    demo.launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
        prevent_thread_lock=True,
        **launch_kwargs(),
    )
    # The page is up; load torch and the model code now rather than at the first click.
    import ui.runtime  # noqa: F401, E402

    demo.block_thread()
