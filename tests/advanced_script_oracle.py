"""The oracle of tests/test_pivotal.py: ``TokenEmbeddingsHandler`` of diffusers'
``examples/advanced_diffusion_training/train_dreambooth_lora_sdxl_advanced.py`` (Apache-2.0, The HuggingFace Team),
verbatim but for its prints and asserts, and without ``save_embeddings`` (token_files.py is checked against the
files diffusers' pipeline loads instead)."""
from typing import List, Optional

import torch


class TokenEmbeddingsHandler:
    def __init__(self, text_encoders, tokenizers):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers

        self.train_ids: Optional[torch.Tensor] = None
        self.inserting_toks: Optional[List[str]] = None
        self.embeddings_settings = {}

    def initialize_new_tokens(self, inserting_toks: List[str]):
        idx = 0
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders):
            self.inserting_toks = inserting_toks
            special_tokens_dict = {"additional_special_tokens": self.inserting_toks}
            tokenizer.add_special_tokens(special_tokens_dict)
            text_encoder.resize_token_embeddings(len(tokenizer))

            self.train_ids = tokenizer.convert_tokens_to_ids(self.inserting_toks)

            # random initialization of new tokens
            std_token_embedding = (
                text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
            ).embeddings.token_embedding.weight.data.std()

            (
                text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
            ).embeddings.token_embedding.weight.data[self.train_ids] = (
                torch.randn(
                    len(self.train_ids),
                    (
                        text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
                    ).config.hidden_size,
                )
                .to(device=self.device)
                .to(dtype=self.dtype)
                * std_token_embedding
            )
            self.embeddings_settings[f"original_embeddings_{idx}"] = (
                text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
            ).embeddings.token_embedding.weight.data.clone()
            self.embeddings_settings[f"std_token_embedding_{idx}"] = std_token_embedding

            inu = torch.ones((len(tokenizer),), dtype=torch.bool)
            inu[self.train_ids] = False

            self.embeddings_settings[f"index_no_updates_{idx}"] = inu

            idx += 1

    @property
    def dtype(self):
        return self.text_encoders[0].dtype

    @property
    def device(self):
        return self.text_encoders[0].device

    @torch.no_grad()
    def retract_embeddings(self):
        for idx, text_encoder in enumerate(self.text_encoders):
            index_no_updates = self.embeddings_settings[f"index_no_updates_{idx}"]
            (
                text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
            ).embeddings.token_embedding.weight.data[index_no_updates] = (
                self.embeddings_settings[f"original_embeddings_{idx}"][index_no_updates]
                .to(device=text_encoder.device)
                .to(dtype=text_encoder.dtype)
            )

            # for the parts that were updated, we need to normalize them
            # to have the same std as before
            std_token_embedding = self.embeddings_settings[f"std_token_embedding_{idx}"]

            index_updates = ~index_no_updates
            new_embeddings = (
                text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
            ).embeddings.token_embedding.weight.data[index_updates]
            off_ratio = std_token_embedding / new_embeddings.std()

            new_embeddings = new_embeddings * (off_ratio**0.1)
            (
                text_encoder.text_model if hasattr(text_encoder, "text_model") else text_encoder
            ).embeddings.token_embedding.weight.data[index_updates] = new_embeddings
