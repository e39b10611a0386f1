"""Real-ESRGAN Ultimate engine: models, tiled inference, faces, video, the settings advisor.

No gradio here. Public API is re-exported lazily so ``import engine`` stays cheap and side-effect free.
"""
