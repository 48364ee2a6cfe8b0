from .domain_dataset import UNLABELLED, ArrayDomainDataset, DomainDataset, FileDomainDataset
from .holdout import holdout_split
from .readers import (
    DATASET_DOMAINS, DATASETS, create_domain_datasets, dataset_domains, default_domains, file_suffixes,
    read_class_folders, read_unlabelled_folder)
from .samplers import CyclingBatchSampler, DomainBalancedSampler
from .transforms import TransformedDataset, TwoViewDataset, create_uda_transforms, test_data_config
