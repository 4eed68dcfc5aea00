"""The models the jobs train: Hugging Face Flax models and our NNX ones, loaded and presented through one
interface (`train.models.interface.Model`)."""
