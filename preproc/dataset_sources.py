"""Where each dataset comes from, how to check it, and how it becomes formatted arrays: one row per
dataset (RECIPES), read by preproc/prepare.py.

A Source is one file: an archive (.tar, .tgz, .tar.gz, .zip: extracted into data/<dataset>/) or a
plain file (.csv, .txt: moved there as it is). `provides` lists paths, relative to data/<dataset>/,
that exist once the source is in place: they say that a step is done, and they let --from-dir take
an already extracted folder instead of the archive. A Source without `url` is user-supplied: it is
taken from --from-dir only, and the recipe's `user_help` says how to obtain it.

Checksums and sizes: every value below was read from the source named in `verified_from` (docs/
datasets.md lists them with what could not be verified). A downloaded file must match every checksum
given (md5 and sha256, computed in one pass); a source without a published checksum is recorded with
the sha256 of what was fetched, which prepare.py prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

GB = 10 ** 9


@dataclass(frozen=True)
class Source:
    name: str  # file name: on disk, on a --mirror, and in a --from-dir folder
    provides: tuple[str, ...]  # paths relative to data/<dataset>/ that exist once it is in place
    url: Optional[str] = None  # None: user-supplied
    size: Optional[int] = None  # bytes
    md5: Optional[str] = None
    sha256: Optional[str] = None
    verified_from: str = ""

    @property
    def is_archive(self) -> bool:
        return self.name.endswith((".tar", ".tgz", ".tar.gz", ".zip"))

    @property
    def checksums(self) -> dict[str, str]:
        return {algo: value for algo, value in (("md5", self.md5), ("sha256", self.sha256)) if value}


@dataclass(frozen=True)
class Recipe:
    """One dataset: its sources, its format step and whether observed labels are sampled."""
    name: str  # the -d name and the folder under --data-root
    title: str
    sources: tuple[Source, ...]
    format_module: str  # a preproc script with main(argv); it gets --load-path/--save-path
    format_args: tuple[str, ...] = ()
    format_outputs: tuple[str, ...] = ("formatted_train_images.npy", "formatted_train_labels.npy",
                                       "formatted_val_images.npy", "formatted_val_labels.npy")
    observed: bool = True  # run generate_observed_labels.py --dataset <name> after formatting
    user_help: tuple[str, ...] = field(default=())  # how to obtain the user-supplied sources

    @property
    def downloads(self) -> tuple[Source, ...]:
        return tuple(s for s in self.sources if s.url)

    @property
    def user_sources(self) -> tuple[Source, ...]:
        return tuple(s for s in self.sources if not s.url)


# Where the values come from (docs/datasets.md quotes each one):
TORCHVISION_VOC = "md5: torchvision/datasets/voc.py (torchvision 0.28)"
TORCHVISION_PROTO = "sha256: pytorch/vision torchvision/prototype/datasets/_builtin/{}.py"
TFDS = "size (and the same sha256): tensorflow/datasets tensorflow_datasets/url_checksums/{}.txt"
PADDLE_COCO = "md5: PaddlePaddle/PaddleDetection dataset/coco/download_coco.py"
CUB_MD5 = "md5: as used with Caltech's archive by TDeVries/cub2011_dataset and derived loaders (not Caltech)"
OPENIMAGES_V6 = ("URL: OpenImages V6 download page (the label CSVs and class descriptions as listed by "
                 "openvinotoolkit/datumaro's Open Images docs); no checksum or size is published")
VOC_HOST = "https://thor.robots.ox.ac.uk/pascal/VOC"  # torchvision's current host of the VOC archives


def _voc(year: str, name: str, size: int, md5: str, sha256: str, provides: tuple[str, ...]) -> Source:
    return Source(name, provides, url=f"{VOC_HOST}/voc{year}/{name}", size=size, md5=md5, sha256=sha256,
                  verified_from="; ".join((TORCHVISION_VOC, TORCHVISION_PROTO.format("voc"), TFDS.format("voc"))))


def _coco(path: str, size: int, md5: str, sha256: str, provides: tuple[str, ...]) -> Source:
    return Source(path.rsplit("/", 1)[1], provides, url=f"http://images.cocodataset.org/{path}", size=size,
                  md5=md5, sha256=sha256,
                  verified_from="; ".join((PADDLE_COCO, TORCHVISION_PROTO.format("coco"), TFDS.format("coco2014"))))


def _openimages(path: str) -> Source:
    return Source(path.rsplit("/", 1)[1], (path.rsplit("/", 1)[1],),
                  url=f"https://storage.googleapis.com/openimages/{path}", verified_from=OPENIMAGES_V6)


VOC2012_MAIN = "VOCdevkit/VOC2012/ImageSets/Main"
VOC2007 = "VOCdevkit/VOC2007"

NUSWIDE_HELP = (
    "NUS-WIDE is distributed by its authors (Lab for Media Search, National University of Singapore; "
    "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html).",
    "Labels: from that page (or the authors' NExTplusplus/NUS-WIDE release) take the concept list "
    "Concepts81.txt, the image lists ImageList/TrainImagelist.txt and TestImagelist.txt, and "
    "Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt.",
    "Images: ask the authors for the raw images (the page's Agreement and Disclaimer Form, filled in and "
    "sent to the contact it names); they arrive as Flickr/<concept folder>/<file>.jpg.",
    "Put Concepts81.txt, ImageList/ (or ImageList.zip), Groundtruth/ (or Groundtruth.zip) and Flickr/ (or "
    "Flickr.zip) in one folder and run again with --from-dir FOLDER; images the lists name but the "
    "folder lacks are left out and counted.",
)

OPENIMAGES_HELP = (
    "The label CSVs are downloaded; the images are not: either PartialLabelingCSL's resized copy "
    "(its OpenImages.md: https://miil-public-eu.oss-eu-central-1.aliyuncs.com/public/Open_Images_V6/"
    "train.tar.gz and test.tar.gz, short side 256 px, no checksum published), or the official images "
    "through OpenImages' downloader (https://storage.googleapis.com/openimages/web/download_v6.html).",
    "Put train.tar.gz and test.tar.gz, or the folders train/ and test/ of <ImageID>.jpg files, in one "
    "folder and run again with --from-dir FOLDER; images the CSVs name but the folders lack are left "
    "out and counted.",
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("pascal", "PASCAL VOC 2012 trainval", (
        _voc("2012", "VOCtrainval_11-May-2012.tar", 1_999_639_040, "6cd6e144f989b92b3379bac3b3de84fd",
             "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb",
             (f"{VOC2012_MAIN}/aeroplane_train.txt", "VOCdevkit/VOC2012/JPEGImages")),
    ), "preproc.format_pascal"),
    Recipe("voc2007", "PASCAL VOC 2007 trainval and test", (
        _voc("2007", "VOCtrainval_06-Nov-2007.tar", 460_032_000, "c52e279531787c972589f7e41ab4ae64",
             "7d8cd951101b0957ddfd7a530bdc8a94f06121cfc1e511bb5937e973020c7508",
             (f"{VOC2007}/ImageSets/Main/trainval.txt", f"{VOC2007}/Annotations", f"{VOC2007}/JPEGImages")),
        _voc("2007", "VOCtest_06-Nov-2007.tar", 451_020_800, "b6e924de25625d8de591ea690078ad9f",
             "6836888e2e01dca84577a849d339fa4f73e1e4f135d312430c4856b5609b4892",
             (f"{VOC2007}/ImageSets/Main/test.txt",)),
    ), "preproc.format_pascal", format_args=("--year", "2007"),
        format_outputs=("formatted_train_images.npy", "formatted_train_labels.npy", "formatted_val_images.npy",
                        "formatted_val_labels.npy", "formatted_val_ignore.npy")),
    Recipe("coco", "MS-COCO 2014 train and val", (
        _coco("zips/train2014.zip", 13_510_573_713, "0da8c0bd3d6becc4dcb32757491aca88",
              "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775", ("train2014",)),
        _coco("zips/val2014.zip", 6_645_013_297, "a3d79f5ed8d289b7a7554ce06a5782b3",
              "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0", ("val2014",)),
        _coco("annotations/annotations_trainval2014.zip", 252_872_794, "0a379cfc70b0e71301e0f377548639bd",
              "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
              ("annotations/instances_train2014.json", "annotations/instances_val2014.json")),
    ), "preproc.format_coco"),
    Recipe("cub", "CUB-200-2011", (
        Source("CUB_200_2011.tgz", ("attributes.txt", "CUB_200_2011/images.txt", "CUB_200_2011/images"),
               url="https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1",
               size=1_150_585_339, md5="97eceeb196236b17998738112f37df78",
               sha256="0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081",
               verified_from="; ".join((CUB_MD5, TORCHVISION_PROTO.format("cub200"),
                                        TFDS.format("caltech_birds2011")))),
    ), "preproc.format_cub"),
    Recipe("nuswide", "NUS-WIDE (81 concepts)", (
        Source("Concepts81.txt", ("Concepts81.txt",)),
        Source("ImageList.zip", ("ImageList/TrainImagelist.txt", "ImageList/TestImagelist.txt")),
        Source("Groundtruth.zip", ("Groundtruth/TrainTestLabels",)),
        Source("Flickr.zip", ("Flickr",)),
    ), "preproc.format_nuswide", user_help=NUSWIDE_HELP),
    Recipe("openimages", "OpenImages V6 (human-verified image labels)", (
        _openimages("v6/oidv6-class-descriptions.csv"),
        _openimages("v6/oidv6-classes-trainable.txt"),
        _openimages("v6/oidv6-train-annotations-human-imagelabels.csv"),
        _openimages("v5/test-annotations-human-imagelabels.csv"),
        Source("train.tar.gz", ("train",)),
        Source("test.tar.gz", ("test",)),
    ), "preproc.format_openimages",
        format_outputs=("formatted_train_images.npy", "formatted_train_labels.npy", "formatted_val_images.npy",
                        "formatted_val_labels.npy", "classnames.txt", "class_ids.txt"),
        observed=False,  # the annotations are the observed labels (data/openimages/README.md)
        user_help=OPENIMAGES_HELP),
)}
