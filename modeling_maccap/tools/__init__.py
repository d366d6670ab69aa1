"""The application around the model, never shipped as remote code: assembling from components and open_clip, the
two converters, training, the batch jobs (caption, eval, VQA), publishing, and the `maccap` command line."""
