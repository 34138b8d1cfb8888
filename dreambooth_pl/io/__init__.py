"""Every file this project writes or reads goes through here: atomic writes and folders (fsync, umask mode, temps
of dead writers cleaned), JSON and PNG metadata, and safe loading of safetensors, checkpoints and the JSON files the
project writes (:func:`read_json`).

Exempt, by design: files the user hands in are read by their own parsers, which name the file (YAML configs in
config_guard.py, moved_keys.py, runs.py, tools/typed_yaml.py and tools/ablation_grid.py; prompt files in prompts.py;
photos, masks and captions in data/images.py and data/faces.py); diagnostics are streamed as they are produced (fit
and job logs appended by tools/jobs.py, benchmark rows appended one per run, tools/step_profile.py's traces,
/proc reads of callbacks/progress.py); bases.py writes tokenizer files into temporary folders (scratch BPE files,
and the folder :func:`atomic_dir` publishes whole); ``save_pretrained`` writes inside :func:`atomic_dir`."""
from .files import (OWNER_FILE, TEMP_SUFFIX, OutputError, WriteError, atomic_write, check_writable, clean_stale_temps,
                    ensure_writable, is_ours, owner_info, write_bytes, write_json, write_text)
from .outputs import atomic_dir, check_output_dir, check_output_file, check_replaceable
from .load import (CheckpointError, UnsafeFileError, check_safetensors, file_kind, load_checkpoint, load_safetensors,
                   parse_json, read_json)
from .png import PNG_KEY, a1111_parameters, read_png_metadata, save_image, write_png

__all__ = ["OWNER_FILE", "TEMP_SUFFIX", "OutputError", "WriteError", "atomic_dir", "atomic_write",
           "check_output_dir", "check_output_file", "check_replaceable", "check_writable", "clean_stale_temps", "ensure_writable", "is_ours", "owner_info",
           "write_bytes", "write_json", "write_text", "CheckpointError", "UnsafeFileError", "check_safetensors",
           "file_kind", "load_checkpoint", "load_safetensors", "parse_json", "read_json", "PNG_KEY", "a1111_parameters",
           "read_png_metadata", "save_image", "write_png"]
