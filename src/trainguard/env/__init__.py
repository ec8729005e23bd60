"""Environment verification: installed packages against RECORD, .pth files, pyc, snapshots."""
