"""Reading DICOM: the header scan, series selection, the HU volume, and what goes back to the PACS.

pydicom checks every value it converts against its VR and, by default, warns and logs the value it
finds invalid (``Invalid value for VR IS: '<the value>'``): a PatientID stored as IS would reach
ctwatch's log and stderr. ctwatch reads values as pydicom converts them and says in its own words,
never quoting them, what it cannot read (:func:`processor.dicom.scan.header_value`), so pydicom's
checks on reading are turned off here, for every process that reads DICOM.
"""

from pydicom import config as _pydicom_config

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
