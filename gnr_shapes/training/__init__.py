"""Training of the small SD-1.x-format "shapes" model and its judge on this CPU.

Command-line entry points (each seeded, resumable with ``--resume``, with a ``--smoke`` mode):

- ``python -m gnr_shapes.training.vae``   — AutoencoderKL on rendered scenes.
- ``python -m gnr_shapes.training.unet``  — UNet2DConditionModel + CLIP text encoder, jointly.
- ``python -m gnr_shapes.training.export`` — assemble a diffusers StableDiffusionPipeline folder.
- ``python -m gnr_shapes.training.judge`` — the pixel-space attribute classifier.
- ``python -m gnr_shapes.training.evaluate`` — text-to-image fidelity and inversion PSNR.
- ``python -m gnr_shapes.training.guidance_teacher`` — distil CFG into a guidance-embedded UNet (``teacher.pt``).
- ``python -m gnr_shapes.training.consistency`` — iCD reverse + forward consistency LoRAs of that teacher.
"""
