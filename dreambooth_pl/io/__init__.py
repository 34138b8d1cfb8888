"""Every file this project writes or reads goes through here: atomic writes and folders (fsync, umask mode, temps
of dead writers cleaned), JSON and PNG metadata, and safe loading of safetensors and checkpoints."""
from .files import (OWNER_FILE, TEMP_SUFFIX, OutputError, WriteError, atomic_write, check_writable, clean_stale_temps,
                    ensure_writable, is_ours, owner_info, write_bytes, write_json, write_text)
from .outputs import atomic_dir, check_output_dir, check_output_file, check_replaceable
from .load import (CheckpointError, UnsafeFileError, check_safetensors, file_kind, load_checkpoint, load_safetensors,
                   parse_json)
from .png import PNG_KEY, a1111_parameters, read_png_metadata, save_image, write_png

__all__ = ["OWNER_FILE", "TEMP_SUFFIX", "OutputError", "WriteError", "atomic_dir", "atomic_write",
           "check_output_dir", "check_output_file", "check_replaceable", "check_writable", "clean_stale_temps", "ensure_writable", "is_ours", "owner_info",
           "write_bytes", "write_json", "write_text", "CheckpointError", "UnsafeFileError", "check_safetensors",
           "file_kind", "load_checkpoint", "load_safetensors", "parse_json", "PNG_KEY", "a1111_parameters",
           "read_png_metadata", "save_image", "write_png"]
